"""Shared types. A batch and a model output are ``dict[str, Tensor]`` keyed by modality.

Batch keys:
    ``"image"``: (B, 3, H, W) float, normalised.
    ``"video"``: (B, T, 3, H, W) float.
    ``"audio"``: (B, S) waveform or (B, F, T) features, per the encoder.
    ``"text"``: (B, L) int64 token ids.
    ``"<m>_mask"``: (B, L) bool, **True = a real token/frame (keep), False = padding**.

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


def mask_key(modality: str) -> str:
    """The batch key holding ``modality``'s padding mask (True = keep)."""
    return f"{modality}_mask"
