"""Shared types. A batch and a model output are ``dict[str, Tensor]`` keyed by modality.

Batch keys:
    ``"image"``: (B, 3, H, W) float, normalised.
    ``"video"``: (B, T, 3, H, W) float.
    ``"audio"``: (B, S) waveform or (B, F, T) features, per the encoder.
    ``"text"``: (B, L) int64 token ids.
    ``"<m>_mask"``: (B, L) bool, **True = a real token/frame (keep), False = padding**.
    ``"<m>_valid"``: (B,) bool, **True = the sample has modality m**; a sample without it holds
        zeros there, and every loss pair using m ignores it (absent key: all valid).

Views: one extra axis after B holds several views of one sample, e.g. ``"text"`` (B, K, L) for
K captions of a clip (MIL-NCE) or ``"video"`` (B, V, T, 3, H, W) for V clips x crops at
evaluation; the model then returns (B, K, E) for that modality (``SAMPLE_DIMS`` tells the two apart).

Model output keys: one (B, E) L2-normalised embedding per modality present, plus
``"logit_scale"`` (scalar, already exponentiated and clamped) and optionally
``"logit_bias"`` (scalar, SigLIP).

Input specs: what each modality's tower takes (``ImageSpec``, ``TextSpec``, ``VideoSpec``,
``AudioSpec``); a tower's ``input_spec()`` returns its own, the model's ``data_context()`` holds them by
modality, and the data ops read their sizes, rates, normalisation and tokenizer there. ``SPEC_TYPES``
is the list of modalities: the encoder registries and ``MODALITIES`` come from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import Tensor

Batch = dict[str, Tensor]


class _Record:
    def record(self) -> dict[str, Any]:
        """The spec as plain data (what ``model_id`` hashes)."""
        return asdict(self)


@dataclass(frozen=True)
class ImageSpec(_Record):
    """An image tower's input: ``size`` (H, W), normalisation ``mean`` / ``std``, resize ``interpolation``."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    patches: int | None = None  # patches a vision transformer cuts the image into (masked prediction); None: not one
    sample_dims: ClassVar[int] = 3  # (3, H, W)


@dataclass(frozen=True)
class TextSpec:
    """A text tower's input: token ids from ``tokenizer`` (picklable ``list[str] -> {"text", "text_mask"}``)."""

    tokenizer: Any
    sample_dims: ClassVar[int] = 1  # (L,)

    def record(self) -> dict[str, Any]:
        """The tokenizer's record (``Tokenizer.record``: its kind and context length), as plain data."""
        return {"tokenizer": self.tokenizer.record()}


@dataclass(frozen=True)
class VideoSpec(_Record):
    """A video tower's input: T ``frames`` sampled at ``fps``, ``size`` x ``size``, normalised."""

    frames: int
    fps: float
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sample_dims: ClassVar[int] = 4  # (T, 3, H, W)


@dataclass(frozen=True)
class AudioSpec(_Record):
    """An audio tower's input: ``seconds`` of mono audio at ``sample_rate``."""

    sample_rate: int
    seconds: float
    sample_dims: ClassVar[int] = 1  # (S,) waveform


SPEC_TYPES: dict[str, type] = {"image": ImageSpec, "video": VideoSpec, "audio": AudioSpec, "text": TextSpec}
MODALITIES: tuple[str, ...] = tuple(SPEC_TYPES)
SAMPLE_DIMS: dict[str, int] = {m: t.sample_dims for m, t in SPEC_TYPES.items()}  # dims of one sample, no views


def valid_key(modality: str) -> str:
    """The batch key holding which samples have ``modality`` (B,) bool, True = present."""
    return f"{modality}_valid"


def mask_key(modality: str) -> str:
    """The batch key holding ``modality``'s padding mask (True = keep)."""
    return f"{modality}_mask"
