"""Captioning decoders, by registry: a text decoder with causal self-attention over the caption so far and
cross-attention to the image tower's tokens, predicting the next token of the text tower's tokenizer.

``coca``: open_clip's CoCa decoder (its ``MultimodalTransformer``), whose input is the text tower's own
token features (the text tower is CoCa's unimodal decoder, so it must be causal: ``openclip_text`` with
``output_tokens``); open_clip's CoCa checkpoints load into it and export back. ``locca``: a decoder with
its own token and position embeddings (LocCa, SigLIP 2's captioner), for any text tower's tokenizer,
bidirectional ones included (a LiT model's locked BERT).

A decoder reads ``tokens[m]`` for each modality in ``token_inputs`` (the towers' ``forward_tokens``, taken
in the same pass as the pooled embedding) and the batch's token ids, and writes ``caption_logits`` (T, V)
and ``caption_labels`` (T,): the teacher-forced next-token logits and targets at the T positions of the
batch's captions that have a target (padding left out before the vocabulary projection, the costly part:
a caption is a few tokens of a 32- or 77-token context), which the ``caption`` objective scores.
``forward`` gives the logits at every position, (B, L, V), as open_clip's CoCa; ``models.generate``
decodes from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from open_clip.coca_model import MultimodalCfg, _build_text_decoder_tower
from open_clip.transformer import MultimodalTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmpretrain.config.strict import ConfigError, typed_params
from mmpretrain.encoders.openclip import _check_open_clip, _merged_cfg
from mmpretrain.registry import Registry
from mmpretrain.types import Batch

IGNORE = -100  # a label position past the caption's end (cross_entropy's ignore_index)
DECODERS: Registry[nn.Module] = Registry("caption decoder")


class CaptionDecoder(nn.Module):
    """Shared by the decoders: ``inputs(towers, ids, text_tokens)`` embeds a caption (B, L) -> (B, L, width);
    ``hidden(image_tokens, inputs)`` -> (B, L, width) after the final norm; ``project`` -> logits over the
    vocabulary; ``forward`` is both (B, L, V). ``decoder``: open_clip's ``MultimodalTransformer``."""

    token_inputs: tuple[str, ...] = ("image",)  # whose tower tokens the decoder reads
    decoder: MultimodalTransformer

    def inputs(self, towers: nn.ModuleDict, ids: Tensor, text_tokens: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def image_inputs(self, image_tokens: Tensor) -> Tensor:
        return image_tokens

    def hidden(self, image_tokens: Tensor, inputs: Tensor) -> Tensor:
        """open_clip's ``MultimodalTransformer.forward`` up to its final norm (batch first)."""
        d, image, x = self.decoder, self.image_inputs(image_tokens), inputs
        mask = d.attn_mask[: x.shape[1], : x.shape[1]]
        for resblock, cross in zip(d.resblocks, d.cross_attn):
            if d.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(resblock, x, None, None, mask, use_reentrant=False)
                x = checkpoint(cross, x, image, image, None, use_reentrant=False)
            else:
                x = resblock(x, attn_mask=mask)
                x = cross(x, k_x=image, v_x=image)
        return d.ln_final(x)

    def project(self, hidden: Tensor) -> Tensor:
        return hidden @ self.decoder.text_projection

    def forward(self, image_tokens: Tensor, inputs: Tensor) -> Tensor:
        return self.project(self.hidden(image_tokens, inputs))

    def outputs(self, towers: nn.ModuleDict, batch: Batch, tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        """Teacher-forced ``caption_logits`` and ``caption_labels`` of ``batch``; ``tokens``: the towers'
        tokens already taken in this forward pass (a batch with a views axis: the first view's, taken here)."""
        ids = batch["text"]
        image = tokens.get("image")
        if image is None:
            image = towers["image"].forward_tokens({"image": batch["image"][:, 0]})[1]
        keep = batch.get("text_mask", ids != 0)[:, 1:].bool()  # positions whose next token is the caption's
        hidden = self.hidden(image, self.inputs(towers, ids, tokens.get("text"))[:, :-1])
        return {"caption_logits": self.project(hidden[keep]), "caption_labels": ids[:, 1:][keep]}

    def next_logits(self, towers: nn.ModuleDict, image_tokens: Tensor, ids: Tensor) -> Tensor:
        """The logits of the token after ``ids`` (B, L), (B, V): a generation step (no cache, as open_clip)."""
        return self.project(self.hidden(image_tokens, self.inputs(towers, ids))[:, -1])


def _init_decoder(decoder: MultimodalTransformer) -> None:
    """open_clip's ``MultimodalTransformer.init_parameters`` (which reaches for an attribute the class lacks,
    and is never called by CoCa, whose vocabulary projection starts as uninitialised memory), done here."""
    width, layers = decoder.width, decoder.layers
    proj_std, attn_std, fc_std = width**-0.5 * (2 * layers) ** -0.5, width**-0.5, (2 * width) ** -0.5
    for block in [*decoder.resblocks, *decoder.cross_attn]:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    if decoder.text_projection is not None:
        nn.init.normal_(decoder.text_projection, std=width**-0.5)


@dataclass(frozen=True)
class CocaParams:
    """open_clip's CoCa decoder: ``model_name`` an open_clip CoCa config (``coca_ViT-B-32``) and/or
    ``multimodal_cfg`` fields (``MultimodalCfg``: width, layers, heads, context_length, vocab_size)."""

    model_name: str | None = None
    multimodal_cfg: dict[str, Any] = field(default_factory=dict)
    quick_gelu: bool = False

    def __post_init__(self) -> None:
        _check_open_clip(MultimodalCfg, self.model_name, "multimodal_cfg", self.multimodal_cfg)


class CocaDecoder(CaptionDecoder):
    """open_clip's ``text_decoder`` over the image tower's (attention-pooled) tokens and the text tower's."""

    token_inputs = ("image", "text")

    def __init__(self, params: CocaParams, towers: nn.ModuleDict):
        super().__init__()
        text = getattr(towers["text"], "text", None)
        if not getattr(text, "output_tokens", False):
            raise ConfigError(
                "model.decoder coca: its input is the text tower's tokens: use an openclip_text tower with "
                "text_cfg.output_tokens: true (and embed_cls: true, as open_clip's coca_* configs), or a locca decoder"
            )
        cfg = _merged_cfg(MultimodalCfg, params.model_name, "multimodal_cfg", params.multimodal_cfg)
        self.decoder = _build_text_decoder_tower(cfg.vocab_size, cfg, quick_gelu=params.quick_gelu)
        _init_decoder(self.decoder)

    def inputs(self, towers: nn.ModuleDict, ids: Tensor, text_tokens: Tensor | None = None) -> Tensor:
        return towers["text"].forward_tokens({"text": ids})[1] if text_tokens is None else text_tokens


@dataclass(frozen=True)
class LoccaParams:
    """A decoder of its own (LocCa): ``width``, ``layers`` (each a causal self-attention and a cross-attention
    block), ``heads``; its vocabulary and length are the text tower's tokenizer's."""

    width: int = 256
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    tie_embeddings: bool = True  # the vocabulary projection is the token embedding's transpose (as T5, GPT-2)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} must be a multiple of heads {self.heads}")


class LoccaDecoder(CaptionDecoder):
    """Token + position embeddings, then open_clip's ``MultimodalTransformer`` cross-attending to the image
    tower's tokens (projected to ``width`` when the widths differ)."""

    def __init__(self, params: LoccaParams, towers: nn.ModuleDict):
        super().__init__()
        image, text = towers["image"], towers["text"]
        vocab, length = int(text.vocab_size), int(text.tokenizer().context_length)
        self.token_embedding = nn.Embedding(vocab, params.width)
        self.positional_embedding = nn.Parameter(torch.randn(length, params.width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.image_proj = nn.Linear(image.token_dim, params.width) if image.token_dim != params.width else nn.Identity()
        self.decoder = MultimodalTransformer(
            width=params.width,
            layers=params.layers,
            heads=params.heads,
            context_length=length,
            mlp_ratio=params.mlp_ratio,
            output_dim=vocab,
        )
        _init_decoder(self.decoder)
        if params.tie_embeddings:
            self.decoder.text_projection = None

    def project(self, hidden: Tensor) -> Tensor:
        weight = self.decoder.text_projection
        return hidden @ (self.token_embedding.weight.T if weight is None else weight)

    def inputs(self, towers: nn.ModuleDict, ids: Tensor, text_tokens: Tensor | None = None) -> Tensor:
        return self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]

    def image_inputs(self, image_tokens: Tensor) -> Tensor:
        return self.image_proj(image_tokens)


TINY_COCA = {"multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@DECODERS.register("coca", config=CocaParams, example=TINY_COCA, open_clip=True)
def build_coca(params: CocaParams, towers: nn.ModuleDict) -> CaptionDecoder:
    """open_clip's CoCa decoder: cross-attends to the image tokens, reads the text tower's tokens."""
    return CocaDecoder(params, towers)


@DECODERS.register("locca", config=LoccaParams, example={"width": 32, "layers": 1, "heads": 2})
def build_locca(params: LoccaParams, towers: nn.ModuleDict) -> CaptionDecoder:
    """LocCa's decoder: its own token embeddings, cross-attending to the image tokens (any text tower)."""
    return LoccaDecoder(params, towers)


def build_decoder(kind: str, params: dict[str, Any], towers: nn.ModuleDict) -> CaptionDecoder:
    if "image" not in towers or "text" not in towers:
        raise ConfigError("model.decoder: a captioning decoder needs an image and a text tower")
    entry = DECODERS.get(kind)
    return entry.builder(typed_params(entry, params, "model.decoder"), towers)
