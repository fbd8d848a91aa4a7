"""Deterministic evaluation inputs for every modality: the one recipe, raw inputs, view averaging.

``EVAL_INPUTS`` holds, per modality, the data ops that turn a raw sample (webdataset members, a
file read into ``{ext: bytes}``, bytes, or an already decoded PIL image) into the model's input at
evaluation: centre crops for images; ``clips`` x ``crops`` views for video and ``windows`` for
audio, which ``embed_views`` averages (multi-clip / multi-crop evaluation, as ViViT and VATT
report). ``EvalInput`` applies it; every evaluation, embedding job, zero-shot call and the search
service's uploads go through it, so a modality is preprocessed the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from mmpretrain.config.schema import OpSpec
from mmpretrain.data.av_ops import AUDIO_KEYS, VIDEO_KEYS
from mmpretrain.data.ops import IMAGE_KEYS, Op, OpContext, Sample, SampleError, apply_ops, build_ops
from mmpretrain.data.stream import ErrorCounter, ReadLimits
from mmpretrain.registry import Registry


@dataclass(frozen=True)
class Views:
    """Evaluation views: video clips spread over the video x spatial crops, audio windows."""

    clips: int = 1
    crops: int = 1
    windows: int = 1


EVAL_INPUTS: Registry[Callable[[Views], list[OpSpec]]] = Registry("evaluation input")  # attrs: keys


def media_keys(modality: str) -> tuple[str, ...]:
    """The webdataset members (and file suffixes) that hold ``modality``, from its ``EVAL_INPUTS`` entry."""
    return tuple(EVAL_INPUTS.get(modality).attrs["keys"])


@EVAL_INPUTS.register("image", example={"member": "png", "views": {}, "view_count": 1}, keys=IMAGE_KEYS)
def image_inputs(views: Views) -> list[OpSpec]:
    """Decode, resize the short side, centre-crop, normalise -> (3, H, W)."""
    return [OpSpec("decode_image"), OpSpec("resize_center_crop"), OpSpec("to_tensor_normalize")]


@EVAL_INPUTS.register(
    "video", example={"member": "mp4", "views": {"clips": 2, "crops": 3}, "view_count": 6}, keys=VIDEO_KEYS
)
def video_inputs(views: Views) -> list[OpSpec]:
    """``clips`` x ``crops`` deterministic views -> (T, 3, H, W), or (V, T, 3, H, W) when V > 1."""
    return [OpSpec("decode_video", {"train": False, "clips": views.clips, "crops": views.crops})]


@EVAL_INPUTS.register("audio", example={"member": "wav", "views": {"windows": 2}, "view_count": 2}, keys=AUDIO_KEYS)
def audio_inputs(views: Views) -> list[OpSpec]:
    """``windows`` evenly spread windows -> (S,), or (V, S) when V > 1."""
    return [OpSpec("decode_audio", {"train": False, "windows": views.windows})]


def eval_ops(model, modality: str, views: Views = Views()) -> list[Op]:
    """The ops producing ``modality``'s evaluation input for ``model`` (its sizes, rates, normalisation)."""
    return EvalInput(model, modality, views).ops


class EvalInput:
    """``modality``'s evaluation input for a model, by the one recipe (``EVAL_INPUTS``): raw samples,
    files, bytes or PIL images in; the model's input out (``__call__``: one tensor; ``batch``: a
    collated batch with its mask). Picklable and small (the towers' input specs, no tokenizer; the ops
    are built on first use), so DataLoader workers and the service's decoder process can run it."""

    def __init__(self, model, modality: str, views: Views = Views()):
        EVAL_INPUTS.get(modality)  # an unknown modality fails here, naming the known ones
        if modality not in model.modalities:
            raise ValueError(f"model has no {modality!r} tower (towers: {', '.join(model.modalities)})")
        ctx = model.data_context()
        self.modality, self.views = modality, views
        self.ctx = OpContext({m: spec for m, spec in ctx.specs.items() if m != "text"})
        self._ops: list[Op] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ops": None}

    @property
    def ops(self) -> list[Op]:
        if self._ops is None:
            self._ops = build_ops(EVAL_INPUTS.get(self.modality).builder(self.views), self.ctx)
        return self._ops

    def sample(self, item: Any) -> Sample:
        """A raw sample for the ops: a sample dict (copied), a PIL image, bytes, or a file path."""

        if isinstance(item, dict):
            return dict(item)
        if isinstance(item, Image.Image):
            return {"__key__": "image", "image": item}
        if isinstance(item, (bytes, bytearray)):
            return {"__key__": "bytes", media_keys(self.modality)[0]: bytes(item)}
        return file_sample(item, self.modality)

    def __call__(self, item: Any) -> Tensor:
        return apply_ops(self.ops, self.sample(item))[self.modality]

    def batch(self, items: list[Any]) -> dict[str, Tensor]:
        """One batch of ``items``; an item that cannot be decoded raises ``ValueError`` naming it."""

        samples = []
        for item in items:
            try:
                samples.append(apply_ops(self.ops, self.sample(item)))
            except SampleError as exc:
                raise ValueError(
                    f"cannot use {item if not isinstance(item, bytes) else 'the bytes given'} as {self.modality}: {exc}"
                ) from None
        return collate(samples, [self.modality])


def file_sample(path: str | Path, modality: str = "image") -> Sample:
    """A media file as a raw sample ``{"<key>": bytes, "__key__": name}`` for the decode ops; a suffix
    that is not one of the modality's member keys gets its first (the decoders read the content)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{modality} not found: {path}")
    ext = path.suffix.lower().lstrip(".")
    keys = media_keys(modality) if modality in EVAL_INPUTS else ()
    return {"__key__": path.name, (ext if ext in keys else keys[0] if keys else ext): path.read_bytes()}


def capped_file_sample(path: Path, modality: str, errors: ErrorCounter) -> Sample | None:
    """``file_sample`` of a file within the member cap (``ReadLimits``); one over it is counted as
    ``oversized_member`` and not read (None)."""
    if path.stat().st_size > ReadLimits().max_member_bytes:
        errors.note("oversized_member")
        return None
    return file_sample(path, modality)


def collate(samples: list[Sample], keys: list[str]) -> dict[str, Tensor]:
    """Stack the tensor members ``keys`` (and their ``_mask``) of processed samples."""
    out = {}
    for key in keys:
        for k in (key, f"{key}_mask"):
            if k in samples[0]:
                out[k] = torch.stack([s[k] for s in samples])
    return out


@torch.no_grad()
def embed_views(model, modality: str, batch: dict[str, Tensor]) -> Tensor:
    """(B, E) normalised embeddings; several views per sample ((B, V, ...)) are averaged, then renormalised."""
    device = model.device
    emb = model.encode(modality, {k: v.to(device) for k, v in batch.items()})
    return F.normalize(emb.mean(1), dim=-1) if emb.dim() == 3 else emb


def trim_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the padding columns no text of the batch uses: ``{"text": (B, L), "text_mask": (B, L)}`` ->
    (B, L') with L' the longest text. For towers marked ``variable_length`` (mask-aware; tested for
    each) the embeddings are unchanged, and short queries cost a fraction of the full context length."""
    mask = batch["text_mask"]
    used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    return {k: v[:, :used] for k, v in batch.items()}


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], *, batch_size: int = 256, progress: bool = False) -> Tensor:
    """Texts -> (N, E) L2-normalised embeddings on the model's device, tokenised and encoded in batches
    (padding trimmed for ``variable_length`` text towers). The one text encoder of the package."""
    texts = list(texts)
    if not texts:
        raise ValueError("encode_texts: no texts given")
    if "text" not in model.modalities:
        raise ValueError(f"model has no 'text' tower (towers: {', '.join(model.modalities)})")
    tok, device = model.tokenizer(), model.device
    trim = trim_padding if model.variable_length("text") else (lambda b: b)
    out = []
    starts = range(0, len(texts), batch_size)
    for i in tqdm(starts, desc="texts", unit="batch", disable=not progress or len(texts) <= batch_size):
        batch = trim(tok(texts[i : i + batch_size]))
        out.append(model.encode("text", {k: v.to(device) for k, v in batch.items()}, normalize=True))
    return torch.cat(out)
