"""Encoder registries (one per modality) and the encoder contract.

An encoder is an ``nn.Module`` with:
    ``output_dim``: width of what ``forward`` returns;
    ``projects``: True when ``forward`` already maps to the model's ``embed_dim``
        (open_clip towers carry their own projection), so the default head is none;
    ``forward(batch) -> Tensor (B, output_dim)``: reads ``batch[modality]`` (and its mask);
    ``example_batch(batch_size) -> Batch``: a valid random input, used by the generated tests;
    ``input_spec()``: what the tower takes, the modality's spec type in ``types.SPEC_TYPES``
        (``ImageSpec``: size and normalisation; ``TextSpec``: the tokenizer; ``VideoSpec``;
        ``AudioSpec``), which the data ops read through ``model.data_context()``;
    ``set_grad_checkpointing(enable)``.
Text encoders (``TextEncoder``) also give ``tokenizer()``, a picklable ``list[str] -> Batch``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mmpretrain.config.strict import typed_params
from mmpretrain.registry import Registry
from mmpretrain.types import MODALITIES, Batch, ImageSpec, TextSpec

ENCODERS: dict[str, Registry[nn.Module]] = {m: Registry(f"{m} encoder") for m in MODALITIES}

# Builders are called as builder(params: <config dataclass>, *, embed_dim: int) -> Encoder.


class Tokenizer(Protocol):
    def __call__(self, texts: list[str]) -> Batch:
        """Return ``{"text": (B, L) int64, "text_mask": (B, L) bool (True = real token)}``."""

    def save(self, folder: Path) -> dict:
        """Write what rebuilding needs into ``folder``; return the record (JSON, with ``kind``) that
        ``load_tokenizer`` takes back (an export carries its tokenizer: ``mmpretrain.deploy``)."""

    def record(self) -> dict:
        """The record ``save`` returns, without writing anything (``model_id`` hashes it)."""


# kind -> builder(record, folder) -> Tokenizer; the kinds a saved record names
TOKENIZERS: Registry[Tokenizer] = Registry("tokenizer")


def load_tokenizer(record: dict, folder: Path) -> Tokenizer:
    """The tokenizer a ``Tokenizer.save`` record describes, its files read from ``folder``."""
    return TOKENIZERS.build(record["kind"], record, folder)


def register_encoder(
    modality: str, name: str, *, config: type, example: dict | Callable[[], dict], **attrs: Any
) -> Callable:
    """Register ``builder(params, *, embed_dim) -> nn.Module`` for ``modality``.

    ``example``: small valid params (or a function making them, e.g. one that writes a tiny
    weights folder); every registered encoder is built with them by the generated shape /
    gradient-flow / NaN tests. ``attrs``: what callers ask of it (``open_clip``: the open_clip config
    section the tower is, so the model exports to open_clip).
    """
    return ENCODERS[modality].register(name, config=config, example=example, **attrs)


def build_encoder(modality: str, name: str, params: Any, *, embed_dim: int) -> nn.Module:
    entry = ENCODERS[modality].get(name)
    return entry.builder(typed_params(entry, params, f"model.towers.{modality}"), embed_dim=embed_dim)


# ---------------------------------------------------------------- projection heads
HEADS: Registry[nn.Module] = Registry("projection head")


@HEADS.register("linear", example={"in_dim": 8, "out_dim": 8})
def linear_head(in_dim: int, out_dim: int) -> nn.Module:
    """A bias-free linear projection, as CLIP."""
    return nn.Linear(in_dim, out_dim, bias=False)


@HEADS.register("mlp", example={"in_dim": 8, "out_dim": 8})
def mlp_head(in_dim: int, out_dim: int) -> nn.Module:
    """Linear -> GELU -> Linear, with the hidden width of the input."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))


@HEADS.register("none", example={"in_dim": 8, "out_dim": 8})
def no_head(in_dim: int, out_dim: int) -> nn.Module:
    """Identity; the encoder's output must already be ``embed_dim`` wide."""
    if in_dim != out_dim:
        raise ValueError(f"head 'none' needs encoder output_dim ({in_dim}) == model.embed_dim ({out_dim})")
    return nn.Identity()


class ImageEncoder(nn.Module):
    """Shared by image towers: they set ``image_size`` (H, W), ``mean``, ``std``, ``interpolation``."""

    image_size: tuple[int, int]

    def example_batch(self, batch_size: int) -> Batch:
        return {"image": torch.randn(batch_size, 3, *self.image_size)}

    def input_spec(self) -> ImageSpec:
        return ImageSpec(
            tuple(self.image_size),
            tuple(self.mean),
            tuple(self.std),
            getattr(self, "interpolation", "bicubic"),
            getattr(self, "num_patches", None),  # a ConvNet's trunk has none (the property raises AttributeError)
        )


class TextEncoder(nn.Module):
    """Shared by text towers: their input is what ``tokenizer()`` makes of a list of strings."""

    def tokenizer(self) -> Tokenizer:
        raise NotImplementedError

    def input_spec(self) -> TextSpec:
        return TextSpec(self.tokenizer())


def random_tokens(batch_size: int, length: int, vocab: int, *, generator: torch.Generator | None = None) -> Batch:
    """A random text batch with varied lengths: (B, L) ids and a (B, L) True-is-keep mask."""
    lengths = torch.randint(2, length + 1, (batch_size,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ids = torch.randint(1, vocab - 1, (batch_size, length), generator=generator) * mask
    return {"text": ids.long(), "text_mask": mask}


def stacked_groups(tower: nn.Module, layers: list, *, top: list | None = None, stem: list | None = None):
    """A tower's parameters as layer groups, input to output, for layer-wise LR decay (``layer_groups``):
    [``stem`` (the embeddings), *``layers``, ``top``], where whichever of ``stem`` and ``top`` is not given
    takes every parameter the others leave; a layer, ``stem`` or ``top`` is a module, a parameter, or a list
    of them (None entries are skipped). A parameter shared by two places joins the first that names it."""
    taken: set[int] = set()

    def params(parts) -> list[nn.Parameter]:
        out = []
        for part in parts if isinstance(parts, (list, tuple)) else [parts]:
            if part is None:
                continue
            for p in [part] if isinstance(part, nn.Parameter) else part.parameters():
                if id(p) not in taken:
                    taken.add(id(p))
                    out.append(p)
        return out

    named = [params(stem)] if stem is not None else []
    named += [params(layer) for layer in layers] + ([params(top)] if top is not None else [])
    rest = [p for p in tower.parameters() if id(p) not in taken]
    return [*named, rest] if top is None else [rest, *named]


TIMM_BLOCK_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # a timm Block's projections (LoRA)


class BlockStack:
    """For towers built of timm ``blocks`` and a final ``norm`` (the VATT towers): LoRA on each block's
    qkv, attention output and MLP projections; layer-wise LR decay over the embeddings, each block, the norm."""

    def lora_module(self) -> nn.Module:
        """Where LoRA adapters go (``towers.<m>.lora``, models.lora)."""
        return self

    def lora_targets(self) -> str | list[str]:
        return list(TIMM_BLOCK_TARGETS)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        return stacked_groups(self, list(self.blocks), top=[self.norm])


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over tokens. x: (B, L, D); mask: (B, L) True = keep. Returns (B, D)."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
