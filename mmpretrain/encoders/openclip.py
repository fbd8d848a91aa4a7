"""open_clip towers: any open_clip vision tower (ViT, ModifiedResNet, timm backbones incl.
ResNet-ViT hybrids) and open_clip's text transformer, built from an open_clip model config
name and/or explicit ``CLIPVisionCfg``/``CLIPTextCfg`` fields. Their state dicts are
open_clip's own (``visual.*``/text tower keys), which keeps checkpoint conversion trivial.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from mmpretrain.config.strict import ConfigError
from mmpretrain.encoders.base import (
    TOKENIZERS,
    ImageEncoder,
    TextEncoder,
    random_tokens,
    register_encoder,
    stacked_groups,
)
from mmpretrain.types import Batch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_open_clip(cfg_cls: type, model_name: str | None, section: str, overrides: dict[str, Any]) -> None:
    """Fail at config load on an unknown open_clip model name or config field."""

    if model_name is not None and open_clip.get_model_config(model_name) is None:
        raise ConfigError(
            f"model_name: unknown open_clip model {model_name!r}. Valid: {', '.join(open_clip.list_models())}"
        )
    valid = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(f"{section}: unknown open_clip field {unknown[0]!r}. Valid: {', '.join(sorted(valid))}")


def _merged_cfg(cfg_cls: type, model_name: str | None, section: str, overrides: dict[str, Any]) -> Any:
    """open_clip's named config section (if any) with ``overrides`` on top, as ``cfg_cls``."""

    base = dict(open_clip.get_model_config(model_name).get(section, {})) if model_name else {}
    return cfg_cls(**{**base, **overrides})


@dataclass(frozen=True)
class OpenClipVisionParams:
    """``model_name``: an open_clip config (``ViT-B-32``...); ``vision_cfg``: CLIPVisionCfg fields."""

    model_name: str | None = None
    vision_cfg: dict[str, Any] = field(default_factory=dict)
    quick_gelu: bool = False
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # resize filter for evaluation (open_clip's)

    def __post_init__(self) -> None:
        _check_open_clip(CLIPVisionCfg, self.model_name, "vision_cfg", self.vision_cfg)


class _OpenClipLora:
    """Where LoRA adapters go in an open_clip tower (its ``trunk`` attribute's transformer): each block's MLP
    as modules, and its q, k, v weight (nn.MultiheadAttention's in_proj_weight) as a parameter."""

    trunk: str

    def lora_module(self) -> nn.Module:
        return getattr(self, self.trunk)

    def lora_targets(self) -> str | list[str]:
        """Each block's MLP (its attention: ``lora_parameters``)."""
        return r".*resblocks\.\d+\.mlp\.(c_fc|c_proj)"

    def lora_parameters(self) -> list[str]:
        """Each block's q, k, v projection (nn.MultiheadAttention's in_proj_weight), adapted in place."""
        return ["attn.in_proj_weight"]


class OpenClipVision(_OpenClipLora, ImageEncoder):
    """Image (B, 3, H, W) -> (B, embed_dim), open_clip's tower with its own projection."""

    projects = True
    trunk = "visual"

    def __init__(self, params: OpenClipVisionParams, *, embed_dim: int):
        super().__init__()
        cfg = _merged_cfg(CLIPVisionCfg, params.model_name, "vision_cfg", params.vision_cfg)
        self.visual = _build_vision_tower(embed_dim, cfg, quick_gelu=params.quick_gelu)
        size = cfg.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.output_dim = embed_dim
        self.mean, self.std, self.interpolation = params.mean, params.std, params.interpolation

    def forward(self, batch: Batch) -> Tensor:
        return self.forward_tokens(batch)[0]

    def forward_tokens(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(pooled and projected (B, embed_dim), tokens (B, N, D)) in one pass: open_clip's forward with
        ``output_tokens`` (the attentional pooler's queries under ``attentional_pool``, as CoCa reads them)."""
        v = self.visual
        pooled, tokens = v._pool(v.transformer(v._embeds(batch["image"])))
        return (pooled if v.proj is None else pooled @ v.proj), tokens

    @property
    def token_dim(self) -> int:
        return int(self.visual.conv1.out_channels)

    @property
    def num_patches(self) -> int:
        return int(self.visual.grid_size[0] * self.visual.grid_size[1])

    def patch_tokens(self, batch: Batch, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """The transformer's output tokens of the patches, (B, N, width), after the final norm; with ``mask``
        (B, N) bool, the masked patches' embeddings are replaced by ``mask_token`` (width,) before the
        position embedding (masked image modelling: iBOT, TIPS)."""
        v = self.visual
        if v.training and getattr(v.patch_dropout, "prob", 0.0) > 0:
            raise ConfigError("patch tokens under patch_dropout: set vision_cfg.patch_dropout to 0")
        handle = None
        if mask is not None:

            def hook(_module, _inputs, out: Tensor) -> Tensor:  # (B, width, gh, gw)
                m = mask.view(out.shape[0], 1, *out.shape[2:])
                return torch.where(m, mask_token.to(out.dtype).view(1, -1, 1, 1), out)

            handle = v.conv1.register_forward_hook(hook)
        try:
            x = v._embeds(batch["image"])
        finally:
            if handle is not None:
                handle.remove()
        return v._pool(v.transformer(x))[1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """open_clip's (its main branch's layer decay, and ``lock``'s groups): the embeddings (patch conv,
        class and position embeddings, ln_pre), each block (the last with ln_post), the projection."""
        v = self.visual
        blocks = getattr(getattr(v, "transformer", None), "resblocks", None)
        if blocks is None:
            raise ConfigError(f"layer_decay: this open_clip vision tower ({type(v).__name__}) has no numbered blocks")
        layers = [*blocks[:-1], [blocks[-1], v.ln_post]]
        return stacked_groups(v, layers, top=[v.proj, getattr(v, "attn_pool", None), getattr(v, "ln_post", None)])

    def train_top_layers(self, n: int) -> None:
        """Partial unfreezing (``towers.image.trainable_layers``): open_clip's ``lock(unlocked_groups=n)``;
        from the top, the groups are the projection, the last block with the final norm, each other block,
        and the embeddings."""
        self.visual.lock(unlocked_groups=n)


TINY_VISION = {"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}}
TINY_TEXT = {"text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@register_encoder("image", "openclip_vision", config=OpenClipVisionParams, example=TINY_VISION, open_clip="vision_cfg")
def build_openclip_vision(params: OpenClipVisionParams, *, embed_dim: int) -> nn.Module:
    """open_clip vision tower (ViT / ModifiedResNet / timm) from a model name and/or CLIPVisionCfg fields."""
    return OpenClipVision(params, embed_dim=embed_dim)


@dataclass(frozen=True)
class OpenClipTextParams:
    """``model_name``: an open_clip config; ``text_cfg``: CLIPTextCfg fields (BPE tokenizer)."""

    model_name: str | None = None
    text_cfg: dict[str, Any] = field(default_factory=dict)
    quick_gelu: bool = False

    def __post_init__(self) -> None:
        _check_open_clip(CLIPTextCfg, self.model_name, "text_cfg", self.text_cfg)


class BpeTokenizer:
    """open_clip's BPE tokenizer (vocabulary ships in its wheel), built lazily so it pickles small."""

    vocab_size: int | None = 49408  # the ids it emits: a text model's embedding table must be this large

    def __init__(self, context_length: int):
        self.context_length = context_length
        self._tok: SimpleTokenizer | None = None

    def __getstate__(self) -> dict:
        return {"context_length": self.context_length, "_tok": None}

    def _built(self) -> SimpleTokenizer:
        if self._tok is None:
            self._tok = SimpleTokenizer(context_length=self.context_length)
        return self._tok

    def __call__(self, texts: list[str]) -> Batch:
        ids = self._built()(list(texts)).long()
        return {"text": ids, "text_mask": ids != 0}

    def special_ids(self) -> tuple[int, int, int]:
        """(start, end, padding) token ids: what a captioning decoder starts from and stops at."""
        tok = self._built()
        return tok.sot_token_id, tok.eot_token_id, 0

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text, the special tokens left out."""
        sot, eot, pad = self.special_ids()
        return self._built().decode([i for i in ids if i not in (sot, eot, pad)]).strip()

    def save(self, folder: Path) -> dict:
        """Nothing to write (the vocabulary ships in open_clip's wheel); the record."""
        return self.record()

    def record(self) -> dict:
        return {"kind": "openclip_bpe", "context_length": self.context_length}


@TOKENIZERS.register("openclip_bpe", example=lambda: BpeTokenizer(12))
def _load_bpe_tokenizer(record: dict, folder: Path) -> BpeTokenizer:
    """open_clip's BPE tokenizer at a context length (``BpeTokenizer.save``)."""
    return BpeTokenizer(int(record["context_length"]))


class OpenClipText(_OpenClipLora, TextEncoder):
    """Tokens (B, L) -> (B, embed_dim): open_clip's causal text transformer, EOT pooling."""

    projects = True
    trunk = "text"

    def __init__(self, params: OpenClipTextParams, *, embed_dim: int):
        super().__init__()
        cfg = _merged_cfg(CLIPTextCfg, params.model_name, "text_cfg", params.text_cfg)
        if cfg.hf_model_name:
            raise ConfigError("model.towers.text: use the 'hf_text' encoder for Hugging Face text models")
        self.text = _build_text_tower(embed_dim, cfg, quick_gelu=params.quick_gelu)
        self.context_length, self.vocab_size = cfg.context_length, cfg.vocab_size
        self.output_dim = embed_dim

    def forward(self, batch: Batch) -> Tensor:
        out = self.text(batch["text"])
        return out[0] if isinstance(out, tuple) else out  # text_cfg.output_tokens: (pooled, tokens)

    def forward_tokens(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(pooled (B, embed_dim), token features (B, L, width)): CoCa's unimodal text decoder outputs
        (needs ``text_cfg.output_tokens``)."""
        if not self.text.output_tokens:
            raise ConfigError("model.towers.text: token features need text_cfg.output_tokens: true")
        return self.text(batch["text"])

    def tokenizer(self) -> BpeTokenizer:
        return BpeTokenizer(self.context_length)

    def example_batch(self, batch_size: int) -> Batch:
        out = random_tokens(batch_size, self.context_length, self.vocab_size)
        lengths = out["text_mask"].sum(1)
        out["text"][torch.arange(batch_size), lengths - 1] = self.vocab_size - 1  # EOT, pooled by argmax
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.set_grad_checkpointing(enable)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """open_clip's: the embeddings (token and position embeddings), each block (the last with ln_final),
        the projection."""
        t = self.text
        blocks = t.transformer.resblocks
        layers = [*blocks[:-1], [blocks[-1], t.ln_final]]
        return stacked_groups(t, layers, top=[getattr(t, "text_projection", None), getattr(t, "text_pool", None)])

    def train_top_layers(self, n: int) -> None:
        """Partial unfreezing (``towers.text.trainable_layers``): open_clip's ``lock(unlocked_layers=n)``
        (the last n blocks train; embeddings and the final norm stay locked)."""
        self.text.lock(unlocked_layers=n, freeze_layer_norm=True)


@register_encoder("text", "openclip_text", config=OpenClipTextParams, example=TINY_TEXT, open_clip="text_cfg")
def build_openclip_text(params: OpenClipTextParams, *, embed_dim: int) -> nn.Module:
    """open_clip text transformer from a model name and/or CLIPTextCfg fields."""
    return OpenClipText(params, embed_dim=embed_dim)
