"""VATT's text tower: word embeddings and a transformer of timm ``Block``s, the same block as the
video and audio towers, so all three can share one trunk (``model.shared_backbone``, VATT-MA).

Input ``batch["text"]``: (B, L) BPE ids (open_clip's tokenizer, shipped in its wheel);
``batch["text_mask"]``: (B, L) bool, **True = a real token**. Bidirectional attention over real
tokens; the output is the masked mean of the final tokens, (B, width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmpretrain.encoders.base import BlockStack, TextEncoder, masked_mean, random_tokens, register_encoder
from mmpretrain.encoders.openclip import BpeTokenizer
from mmpretrain.types import Batch


@dataclass(frozen=True)
class VattTextParams:
    context_length: int = 32
    vocab_size: int = 49408  # open_clip's BPE vocabulary
    width: int = 192
    heads: int = 3
    layers: int = 6
    mlp_ratio: float = 4.0


class VattText(BlockStack, TextEncoder):
    """(B, L) tokens -> (B, width); a head projects to the shared space."""

    projects = False
    variable_length = True  # mask-aware: batches may drop unused padding columns (api.trim_padding)

    def __init__(self, p: VattTextParams):
        super().__init__()

        self.p, self.output_dim = p, p.width
        self.embed = nn.Embedding(p.vocab_size, p.width)
        self.pos_embed = nn.Parameter(torch.randn(1, p.context_length, p.width) * 0.02)
        self.blocks = nn.ModuleList(Block(p.width, p.heads, p.mlp_ratio, qkv_bias=True) for _ in range(p.layers))
        self.norm = nn.LayerNorm(p.width)
        self.grad_checkpointing = False

    def tokenizer(self) -> BpeTokenizer:
        return BpeTokenizer(self.p.context_length)

    def example_batch(self, batch_size: int) -> Batch:
        return random_tokens(batch_size, self.p.context_length, self.p.vocab_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, batch: Batch) -> Tensor:
        ids = batch["text"]
        mask = batch.get("text_mask", torch.ones_like(ids, dtype=torch.bool))
        mask = mask | ~mask.any(1, keepdim=True)  # an empty text attends to all (no NaN)
        x = self.embed(ids) + self.pos_embed[:, : ids.shape[1]]
        attn = mask[:, None, None, :]
        for block in self.blocks:
            x = (
                checkpoint(block, x, attn, use_reentrant=False)
                if self.grad_checkpointing and self.training
                else block(x, attn_mask=attn)
            )
        return masked_mean(self.norm(x), mask)


@register_encoder(
    "text", "vatt_text", config=VattTextParams, example={"context_length": 12, "width": 32, "heads": 2, "layers": 2}
)
def vatt_text(params: VattTextParams, *, embed_dim: int) -> VattText:
    """Word embeddings + a timm-Block transformer, masked-mean pooled (VATT's text tower)."""
    return VattText(params)
