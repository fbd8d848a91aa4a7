"""Any timm image model as a tower, at any input size: small ViTs and ResNet-ViT hybrids
(``vit_tiny_r_s16_p8_224``: a convolutional stem feeding a transformer) for CPU budgets.

open_clip's timm wrapper keeps timm's default input size (224 px); this one passes
``img_size`` so a ViT can be trained on 64 px images. Random init only (no hub downloads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models import group_parameters, load_state_dict
from torch import Tensor, nn

from mmpretrain.config.strict import ConfigError
from mmpretrain.encoders.base import TIMM_BLOCK_TARGETS, ImageEncoder, register_encoder
from mmpretrain.types import Batch


@dataclass(frozen=True)
class TimmVisionParams:
    """``model_name``: a timm model (``timm.list_models()``); ``kwargs``: passed to
    ``timm.create_model`` (e.g. ``depth``, ``drop_path_rate``)."""

    model_name: str
    image_size: int = 224
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    def __post_init__(self) -> None:
        if not timm.is_model(self.model_name):
            close = timm.list_models(f"*{self.model_name.split('_')[0]}*")[:8]
            raise ConfigError(
                f"model_name: unknown timm model {self.model_name!r}" + (f"; e.g. {', '.join(close)}" if close else "")
            )


class TimmVision(ImageEncoder):
    """Image (B, 3, H, W) -> pooled features (B, num_features); a head projects them."""

    projects = False

    def __init__(self, params: TimmVisionParams):
        super().__init__()

        kwargs = {"img_size": params.image_size, **params.kwargs}
        try:
            self.trunk = timm.create_model(params.model_name, pretrained=False, num_classes=0, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc) or "img_size" in params.kwargs:
                raise ConfigError(f"model.towers.image.params: {params.model_name} does not take {exc}") from None
            kwargs.pop("img_size")  # a ConvNet takes any input size: image_size sets only the preprocessing
            self.trunk = timm.create_model(params.model_name, pretrained=False, num_classes=0, **kwargs)
        self.model_name = params.model_name
        self.output_dim = int(self.trunk.num_features)
        self.image_size = (params.image_size, params.image_size)
        self.mean, self.std, self.interpolation = params.mean, params.std, params.interpolation

    def forward(self, batch: Batch) -> Tensor:
        return self.trunk(batch["image"])

    def forward_tokens(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(pooled (B, num_features), every output token of the trunk (B, N, D)) in one pass (transformers)."""
        if not hasattr(self.trunk, "num_prefix_tokens"):
            raise ConfigError(f"image tokens: {self.model_name} is not a vision transformer")
        x = self.trunk.forward_features(batch["image"])
        return self.trunk.forward_head(x), x

    @property
    def token_dim(self) -> int:
        return int(self.trunk.num_features)

    @property
    def num_patches(self) -> int:
        return int(self.trunk.patch_embed.num_patches)

    def patch_tokens(self, batch: Batch, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """The trunk's output tokens of the patches (``forward_features`` without its prefix tokens), (B, N,
        D); with ``mask`` (B, N) bool, the masked patches' embeddings (``patch_embed``'s output) are
        replaced by ``mask_token`` (D,) (masked image modelling: iBOT, TIPS). Transformers only."""
        embed = getattr(self.trunk, "patch_embed", None)
        if embed is None or not hasattr(self.trunk, "num_prefix_tokens"):
            raise ConfigError(f"patch tokens: {self.model_name} is not a vision transformer")
        handle = None
        if mask is not None:

            def hook(_module, _inputs, out: Tensor) -> Tensor:  # (B, N, D)
                return torch.where(mask[..., None], mask_token.to(out.dtype), out)

            handle = embed.register_forward_hook(hook)
        try:
            x = self.trunk.forward_features(batch["image"])
        finally:
            if handle is not None:
                handle.remove()
        return x[:, self.trunk.num_prefix_tokens :]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def lora_module(self) -> nn.Module:
        """Where LoRA adapters go (``towers.<m>.lora``, models.lora)."""
        return self.trunk

    def lora_targets(self) -> str | list[str]:
        """Each block's qkv and output projections and MLP (not the patch embedding's proj)."""
        return list(TIMM_BLOCK_TARGETS)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """timm's own layer ids (``group_matcher(coarse=False)``, as ``param_groups_layer_decay``): the stem,
        each block, the final norm; a trunk without a group matcher is refused."""

        if not hasattr(self.trunk, "group_matcher"):
            raise ConfigError(f"layer_decay: {self.model_name} has no layer groups (timm group_matcher)")
        by_id = group_parameters(self.trunk, self.trunk.group_matcher(coarse=False))
        named = dict(self.trunk.named_parameters())
        return [[named[n] for n in names] for _, names in sorted(by_id.items())]

    def train_top_layers(self, n: int) -> None:
        """Partial unfreezing (``towers.image.trainable_layers``): the last ``n`` of the trunk's ``blocks``
        and the final norm train; a trunk without ``blocks`` (a ConvNet) is refused."""
        blocks = getattr(self.trunk, "blocks", None)
        if blocks is None or not 0 <= n <= len(blocks):
            raise ConfigError(f"trainable_layers: {self.model_name} has {len(blocks or [])} blocks to unfreeze")
        self.trunk.requires_grad_(False)
        for part in [
            *list(blocks)[len(blocks) - n :],
            getattr(self.trunk, "norm", None),
            getattr(self.trunk, "fc_norm", None),
        ]:
            if part is not None and n:
                part.requires_grad_(True)

    def load_weights_file(self, path: Path) -> list[str]:
        """A timm weights file (``.safetensors``, ``.pth``, ``.bin``; timm's own loader, ``weights_only``) into
        the trunk (``towers.image.init_from``); its classifier, which this tower does not have, is left out.
        Returns the tensor names loaded."""

        state = load_state_dict(str(path), weights_only=True)
        classifier = self.trunk.pretrained_cfg.get("classifier") or "head"
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{h}." for h in heads))}
        missing, unexpected = self.trunk.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"towers.image.init_from {path}: not weights of {self.model_name} "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
        return sorted(state)


@register_encoder(
    "image", "timm_vision", config=TimmVisionParams, example={"model_name": "vit_tiny_r_s16_p8_224", "image_size": 64}
)
def build_timm_vision(params: TimmVisionParams, *, embed_dim: int) -> nn.Module:
    """A timm image model (ViT, ResNet-ViT hybrid, ConvNet) at any input size, random init."""
    return TimmVision(params)
