"""Hugging Face ``CLIPModel`` / ``SiglipModel`` folders as towers (offline, ``local_files_only``).

Each tower loads its half of the folder's weights with transformers' own classes, so the
embeddings are exactly ``get_image_features`` / ``get_text_features``. Image size, mean and std
come from the folder's ``config.json`` / ``preprocessor_config.json``; the tokenizer is the
folder's own.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn

from mmpretrain.config.strict import ConfigError
from mmpretrain.encoders.base import ImageEncoder, TextEncoder, register_encoder
from mmpretrain.encoders.hf_text import HfTokenizer, hf_grad_checkpointing, hf_layer_groups
from mmpretrain.types import Batch

# model_type -> (vision class, text class, output attribute); what differs between the two families
FAMILIES = {
    "clip": ("CLIPVisionModelWithProjection", "CLIPTextModelWithProjection", ("image_embeds", "text_embeds")),
    "siglip": ("SiglipVisionModel", "SiglipTextModel", ("pooler_output", "pooler_output")),
}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class HfClipParams:
    """``path``: a transformers CLIPModel or SiglipModel folder (config.json + weights [+ tokenizer])."""

    path: str

    def __post_init__(self) -> None:
        model_type = hf_model_type(Path(self.path))
        if model_type not in FAMILIES:
            raise ConfigError(
                f"path: {self.path!r} holds a {model_type!r} model; expected one of {', '.join(FAMILIES)}"
            )


def hf_model_type(path: Path) -> str:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"path: no config.json in {str(path)!r}")
    return json.loads(cfg.read_text()).get("model_type", "")


def _load(path: str, which: int) -> tuple[nn.Module, str, object]:
    family = FAMILIES[hf_model_type(Path(path))]
    full = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    sub = full.vision_config if which == 0 else full.text_config
    if getattr(full, "projection_dim", None) is not None:
        sub.projection_dim = full.projection_dim  # lives on the parent config; the sub-config's default is 512
    model = getattr(transformers, family[which]).from_pretrained(
        path, config=sub, local_files_only=True, trust_remote_code=False
    )
    return model, family[2][which], full


class _HfClipTower:
    """What a Hugging Face CLIP/SigLIP tower (``self.model``) shares: activation checkpointing, layer groups
    (layer-wise LR decay) and where LoRA adapters go."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        hf_grad_checkpointing(self.model, enable)

    def layer_groups(self) -> list:
        return hf_layer_groups(self.model)

    def lora_module(self) -> nn.Module:
        """Where LoRA adapters go (``towers.<m>.lora``, models.lora)."""
        return self.model

    def lora_targets(self) -> str | list[str]:
        """Each encoder layer's q/k/v/out projections and MLP (not SigLIP's pooling head)."""
        return r".*encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"


class HfClipVision(_HfClipTower, ImageEncoder):
    """Image (B, 3, H, W) -> (B, E): the folder's vision model and projection."""

    projects = True

    def __init__(self, params: HfClipParams, *, embed_dim: int):
        super().__init__()
        self.model, self.attr, cfg = _load(params.path, 0)
        size = cfg.vision_config.image_size
        self.image_size = (size, size)
        pre = Path(params.path, "preprocessor_config.json")
        pre_cfg = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = tuple(pre_cfg.get("image_mean", CLIP_MEAN))
        self.std = tuple(pre_cfg.get("image_std", CLIP_STD))
        self.interpolation = "bicubic"
        self.output_dim = int(getattr(cfg, "projection_dim", None) or cfg.vision_config.hidden_size)

    def forward(self, batch: Batch) -> Tensor:
        return getattr(self.model(pixel_values=batch["image"]), self.attr)


class HfClipText(_HfClipTower, TextEncoder):
    """Tokens (B, L) + mask -> (B, E): the folder's text model and projection."""

    projects = True

    def __init__(self, params: HfClipParams, *, embed_dim: int):
        super().__init__()
        self.path = params.path
        self.model, self.attr, cfg = _load(params.path, 1)
        self.context_length = int(cfg.text_config.max_position_embeddings)
        self.vocab_size = int(cfg.text_config.vocab_size)
        self.output_dim = int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)

    def forward(self, batch: Batch) -> Tensor:
        mask = batch.get("text_mask")
        kwargs = {"attention_mask": mask.long()} if mask is not None and self.attr == "text_embeds" else {}
        return getattr(self.model(input_ids=batch["text"], **kwargs), self.attr)

    def tokenizer(self) -> HfTokenizer:
        return HfTokenizer(self.path, self.context_length)

    def example_batch(self, batch_size: int) -> Batch:
        ids = torch.randint(1, self.vocab_size - 1, (batch_size, self.context_length))
        return {"text": ids, "text_mask": torch.ones_like(ids, dtype=torch.bool)}


_TINY: dict[str, str] = {}


def tiny_folder(model_type: str = "clip") -> dict[str, str]:
    """A tiny random-init CLIPModel/SiglipModel saved to a temp folder (the registry's example params)."""
    if model_type not in _TINY:
        vision = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        }
        text = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 1000,
            "max_position_embeddings": 16,
        }
        if model_type == "clip":
            cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
            model = transformers.CLIPModel(cfg)
        else:
            cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
            model = transformers.SiglipModel(cfg)
        path = tempfile.mkdtemp(prefix=f"mmpretrain-tiny-{model_type}-")
        torch.manual_seed(0)
        model.save_pretrained(path)
        _TINY[model_type] = path
    return {"path": _TINY[model_type]}


@register_encoder("image", "hf_clip_vision", config=HfClipParams, example=tiny_folder)
def build_hf_clip_vision(params: HfClipParams, *, embed_dim: int) -> nn.Module:
    """The vision half of a transformers CLIPModel / SiglipModel folder."""
    return HfClipVision(params, embed_dim=embed_dim)


@register_encoder("text", "hf_clip_text", config=HfClipParams, example=tiny_folder)
def build_hf_clip_text(params: HfClipParams, *, embed_dim: int) -> nn.Module:
    """The text half of a transformers CLIPModel / SiglipModel folder."""
    return HfClipText(params, embed_dim=embed_dim)
