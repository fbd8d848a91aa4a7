"""Contrastive losses over two (B, E) embedding sets, with negatives from every rank.

Distributed semantics (tested against one process on the concatenated batch):
    * ``gather_with_grad=True``: features are all-gathered with gradient
      (``torch.distributed.nn.functional.all_gather``); with DDP's gradient averaging the
      parameter gradients equal single-process ones, for ``local_loss`` either way.
    * ``gather_with_grad=False``: other ranks' features are constants; the local features'
      gradient is scaled by the world size so that DDP's averaging is again exact.
      (``local_loss`` is refused in this mode: it would drop gradient terms.)
    * ``local_loss=True``: each rank scores its own rows against all columns, O(B * W*B)
      memory instead of O((W*B)^2); the loss value is then rank-local and its mean over
      ranks equals the global loss.
Every rank must pass the same batch size (the loader drops the last partial batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mmpretrain.registry import Registry

# A loss kind: fn(a (B, E), b (B, E), logit_scale (), logit_bias () | None, ctx) -> ()
LossFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "DistContext"], Tensor]
LOSSES: Registry[Tensor] = Registry("loss kind")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    gather_with_grad: bool = True
    local_loss: bool = False


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged, its gradient multiplied by ``factor``."""
    return x if factor == 1.0 else _ScaleGrad.apply(x, factor)


def gather(x: Tensor, ctx: DistContext) -> Tensor:
    """(B, E) on each rank -> (W*B, E), rank-major; this rank's slice keeps its gradient."""
    if ctx.world_size == 1:
        return x
    if ctx.gather_with_grad:
        return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[ctx.rank] = scale_grad(x, float(ctx.world_size))
    return torch.cat(parts, dim=0)


def _pair_logits(a: Tensor, b: Tensor, scale: Tensor, ctx: DistContext) -> tuple[Tensor, Tensor, int]:
    """Logits (rows a vs columns b, and b vs a) and the column offset of this rank's rows."""
    all_a, all_b = gather(a, ctx), gather(b, ctx)
    if ctx.local_loss and ctx.world_size > 1:
        return scale * a @ all_b.T, scale * b @ all_a.T, ctx.rank * a.shape[0]
    logits = scale * all_a @ all_b.T
    return logits, logits.T, 0


@LOSSES.register("clip")
def clip_loss(a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor | None, ctx: DistContext) -> Tensor:
    """Symmetric InfoNCE (CLIP): mean of cross-entropy a->b and b->a; positives on the diagonal."""
    logits_ab, logits_ba, offset = _pair_logits(a, b, logit_scale, ctx)
    if logit_bias is not None:
        logits_ab, logits_ba = logits_ab + logit_bias, logits_ba + logit_bias
    labels = torch.arange(logits_ab.shape[0], device=a.device) + offset
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


@LOSSES.register("siglip")
def siglip_loss(a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor | None, ctx: DistContext) -> Tensor:
    """Sigmoid loss (SigLIP): -sum log sigmoid(+-(s * a.b + bias)) over all pairs, / rows."""
    all_b = gather(b, ctx)
    rows = a if ctx.local_loss else gather(a, ctx)
    offset = ctx.rank * a.shape[0] if ctx.local_loss and ctx.world_size > 1 else 0
    logits = logit_scale * rows @ all_b.T
    if logit_bias is not None:
        logits = logits + logit_bias
    signs = -torch.ones_like(logits)
    idx = torch.arange(rows.shape[0], device=a.device)
    signs[idx, idx + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / rows.shape[0]
