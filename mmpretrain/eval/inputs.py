"""Deterministic evaluation inputs for every modality: op recipes, raw files, view averaging.

``EVAL_INPUTS`` holds, per modality, the data ops that turn a raw sample (webdataset members
or a file read into ``{ext: bytes}``) into the model's input at evaluation: centre crops for
images; ``clips`` x ``crops`` views for video and ``windows`` for audio, which ``embed_views``
averages (multi-clip / multi-crop evaluation, as ViViT and VATT report).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpretrain.config.schema import OpSpec
from mmpretrain.data.ops import Op, Sample, apply_ops, build_ops
from mmpretrain.registry import Registry


@dataclass(frozen=True)
class Views:
    """Evaluation views: video clips spread over the video x spatial crops, audio windows."""

    clips: int = 1
    crops: int = 1
    windows: int = 1


EVAL_INPUTS: Registry[Callable[[Views], list[OpSpec]]] = Registry("evaluation input")


@EVAL_INPUTS.register("image")
def image_inputs(views: Views) -> list[OpSpec]:
    """Decode, resize the short side, centre-crop, normalise -> (3, H, W)."""
    return [OpSpec("decode_image"), OpSpec("resize_center_crop"), OpSpec("to_tensor_normalize")]


@EVAL_INPUTS.register("video")
def video_inputs(views: Views) -> list[OpSpec]:
    """``clips`` x ``crops`` deterministic views -> (T, 3, H, W), or (V, T, 3, H, W) when V > 1."""
    return [OpSpec("decode_video", {"train": False, "clips": views.clips, "crops": views.crops})]


@EVAL_INPUTS.register("audio")
def audio_inputs(views: Views) -> list[OpSpec]:
    """``windows`` evenly spread windows -> (S,), or (V, S) when V > 1."""
    return [OpSpec("decode_audio", {"train": False, "windows": views.windows})]


def eval_ops(model, modality: str, views: Views = Views()) -> list[Op]:
    """The ops producing ``modality``'s evaluation input for ``model`` (its sizes, rates, normalisation)."""
    return build_ops(EVAL_INPUTS.get(modality).builder(views), model.data_context())


def file_sample(path: str | Path) -> Sample:
    """A media file as a raw sample ``{"<ext>": bytes, "__key__": name}`` for the decode ops."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    ext = path.suffix.lower().lstrip(".")
    return {"__key__": path.name, {"jpeg": "jpg"}.get(ext, ext): path.read_bytes()}


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
    device = next(model.parameters()).device
    emb = model.encode(modality, {k: v.to(device) for k, v in batch.items()})
    return F.normalize(emb.mean(1), dim=-1) if emb.dim() == 3 else emb


def process_files(model, modality: str, paths: list[Any], views: Views = Views()) -> dict[str, Tensor]:
    """Decode media files for ``modality`` into one batch; a file that cannot be decoded raises ValueError."""
    from mmpretrain.data.ops import SampleError

    ops = eval_ops(model, modality, views)
    samples = []
    for p in paths:
        try:
            samples.append(apply_ops(ops, file_sample(p)))
        except SampleError as exc:
            raise ValueError(f"cannot use {p} as {modality}: {exc}") from None
    return collate(samples, [modality])
