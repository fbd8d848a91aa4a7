"""A contrastive model: one encoder + projection head per modality, a learnable temperature
(and a bias for SigLIP). It knows nothing of losses or of which modalities pair up."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpretrain.config.schema import ModelConfig, TowerConfig
from mmpretrain.encoders import HEADS, build_encoder
from mmpretrain.types import Batch

if TYPE_CHECKING:
    from mmpretrain.data.ops import OpContext


class ContrastiveModel(nn.Module):
    """Encodes each modality present in a batch into a shared, L2-normalised space.

    ``forward(batch)`` returns ``{m: (B, E) for each modality m in batch and in towers,
    "logit_scale": () already exp'd, ["logit_bias": ()]}``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.towers = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for modality, tower_cfg in cfg.towers.items():
            encoder = build_encoder(modality, tower_cfg.encoder, tower_cfg.params, embed_dim=cfg.embed_dim)
            self.towers[modality] = encoder
            self.heads[modality] = HEADS.build(_head_name(tower_cfg, encoder), encoder.output_dim, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.logit_bias = None if cfg.logit_bias_init is None else nn.Parameter(torch.tensor(float(cfg.logit_bias_init)))
        for modality, tower_cfg in cfg.towers.items():
            if tower_cfg.freeze:
                self.towers[modality].requires_grad_(False)

    @property
    def modalities(self) -> list[str]:
        return list(self.towers.keys())

    def encode(self, modality: str, batch: Batch, *, normalize: bool = True) -> Tensor:
        """Embed ``batch[modality]`` -> (B, E)."""
        features = self.heads[modality](self.towers[modality](batch))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        out = {m: self.encode(m, batch) for m in self.modalities if m in batch}
        out["logit_scale"] = self.logit_scale.exp()
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(logit_scale) in [1, logit_scale_max], as CLIP does after each step."""
        self.logit_scale.clamp_(0.0, math.log(self.cfg.logit_scale_max))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in self.towers.values():
            tower.set_grad_checkpointing(enable)

    def data_context(self) -> "OpContext":
        """What the data ops need from this model: image size, normalisation, tokenizer."""
        from mmpretrain.data.ops import OpContext

        kwargs = {}
        if "image" in self.towers:
            image = self.towers["image"]
            kwargs.update(image_size=tuple(image.image_size), mean=tuple(image.mean), std=tuple(image.std),
                          interpolation=getattr(image, "interpolation", "bicubic"))
        if "text" in self.towers:
            kwargs["tokenizer"] = self.tokenizer()
        return OpContext(**kwargs)

    def tokenizer(self):
        """The text tower's tokenizer: ``list[str] -> {"text", "text_mask"}``."""
        if "text" not in self.towers:
            raise ValueError(f"this model has no text tower (towers: {', '.join(self.modalities)})")
        return self.towers["text"].tokenizer()


def _head_name(tower_cfg: TowerConfig, encoder: nn.Module) -> str:
    if tower_cfg.head != "auto":
        return tower_cfg.head
    return "none" if getattr(encoder, "projects", False) else "linear"


def build_model(cfg: ModelConfig) -> ContrastiveModel:
    return ContrastiveModel(cfg)
