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
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor

Batch = dict[str, Tensor]
Modality = Literal["image", "video", "audio", "text"]
MODALITIES: tuple[str, ...] = ("image", "video", "audio", "text")
SAMPLE_DIMS: dict[str, int] = {"image": 3, "video": 4, "audio": 1, "text": 1}  # dims of one sample, no views


def valid_key(modality: str) -> str:
    """The batch key holding which samples have ``modality`` (B,) bool, True = present."""
    return f"{modality}_valid"


def mask_key(modality: str) -> str:
    """The batch key holding ``modality``'s padding mask (True = keep)."""
    return f"{modality}_mask"
