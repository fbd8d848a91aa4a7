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

Missing modalities: ``valid`` (B,) bool, **True = the sample has both modalities of the pair**.
Invalid samples are neither positives nor negatives: their rows leave the mean and their
columns are masked out of every softmax. A batch with no valid pair gives a zero loss that
still touches the embeddings, so every rank runs the same collectives and backward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (registers torch.distributed.nn.functional)
import torch.nn.functional as F
from torch import Tensor

from mmpretrain.config.strict import ConfigError
from mmpretrain.registry import Registry, RegistryError
from mmpretrain.types import valid_key

# A loss kind: fn(a (B, E), b (B, E) or (B, K, E), logit_scale (), logit_bias () | None, ctx, valid (B,) | None) -> ()
LOSSES: Registry[Tensor] = Registry("loss kind")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    gather_with_grad: bool = True
    local_loss: bool = False
    block: int = 4096  # logits block side of the memory-efficient kinds (clip_blockwise, siglip_chunked)


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


def gather_plain(x: Tensor, ctx: DistContext) -> Tensor:
    """(B,) per-sample values (no gradient) on each rank -> (W*B,), rank-major (bool travels as uint8:
    gloo has no bool)."""
    if ctx.world_size == 1:
        return x
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x
    parts = [torch.empty_like(wire) for _ in range(ctx.world_size)]
    dist.all_gather(parts, wire.contiguous())
    out = torch.cat(parts)
    return out.bool() if x.dtype == torch.bool else out


def _rows_cols(values: Tensor | None, ctx: DistContext) -> tuple[Tensor | None, Tensor | None]:
    """Per-sample ``values`` (validity, group ids) in ``_pair_logits``' layout: (rows, cols), rows local
    under ``local_loss``, else global like the columns."""
    if values is None:
        return None, None
    cols = gather_plain(values, ctx)
    rows = values if ctx.local_loss and ctx.world_size > 1 else cols
    return rows, cols


def _positives(groups: Tensor | None, ctx: DistContext, offset: int, n_rows: int, n_cols: int, device) -> Tensor:
    """(R, C) bool: True where column c is a positive of row r. Without ``groups``, the diagonal (shifted
    by this rank's ``offset`` under ``local_loss``); with them, every column of the row's group id."""
    if groups is None:
        idx = torch.arange(n_rows, device=device)
        positive = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=device)
        positive[idx, idx + offset] = True
        return positive
    rows, cols = _rows_cols(groups, ctx)
    return rows[:, None] == cols[None, :]


def _masked_ce(logits: Tensor, labels: Tensor, rows: Tensor | None, cols: Tensor | None, ctx: DistContext) -> Tensor:
    """Mean cross-entropy over valid rows, with invalid columns excluded from the softmax. ``labels``:
    (R,) class indices, or (R, C) bool positives (several per row: the target is uniform over them)."""
    if labels.dim() == 2:
        if cols is not None:
            labels = labels & cols[None, :]
        labels = labels.to(logits.dtype)
        labels = labels / labels.sum(1, keepdim=True).clamp_min(1)
    if rows is None:
        return F.cross_entropy(logits, labels)
    masked = logits.masked_fill(~cols[None, :], torch.finfo(logits.dtype).min)
    per_row = F.cross_entropy(masked, labels, reduction="none")
    return _masked_mean(per_row, rows, cols, logits, ctx)


def _masked_mean(values: Tensor, rows: Tensor, cols: Tensor, anchor: Tensor, ctx: DistContext) -> Tensor:
    """Mean of ``values`` over the valid ``rows``. Under ``local_loss`` each rank divides its sum by
    (global valid rows / world size), so the mean over ranks (DDP's averaging) is the global mean
    even when ranks hold different numbers of valid samples. With none valid: 0 that still depends
    on ``anchor`` (a finite tensor), so the graph and the collectives stay the same on every rank."""
    local = ctx.local_loss and ctx.world_size > 1
    count = cols.sum() / ctx.world_size if local else rows.sum()
    if not bool(count > 0):
        return anchor.sum() * 0.0
    return torch.where(rows, values, torch.zeros_like(values)).sum() / count  # where: no inf * 0


def pair_valid(out: dict[str, Tensor], a: str, b: str) -> Tensor | None:
    """(B,) bool, True = the sample has both ``a`` and ``b``; None when every sample has both."""
    flags = [out[valid_key(m)] for m in (a, b) if valid_key(m) in out]
    if not flags:
        return None
    return flags[0] & flags[1] if len(flags) == 2 else flags[0]


def _check_flat(kind: str, a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"loss {kind!r} takes (B, E) embeddings, got {tuple(a.shape)} and {tuple(b.shape)}; "
            "several captions per sample (B, K, E) need kind 'milnce'"
        )


@LOSSES.register("clip", example={"views": 1, "logit_bias": None})
def clip_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    ctx: DistContext,
    valid: Tensor | None = None,
    groups: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE (CLIP): mean of cross-entropy a->b and b->a; positives on the diagonal.

    ``groups`` (B,) int64: several positives per row (multi-positive contrastive, as StableRep's): the
    columns of the row's group id, the target spread uniformly over them. Unique ids give ``clip``."""
    _check_flat("clip", a, b)
    logits_ab, logits_ba, offset = _pair_logits(a, b, logit_scale, ctx)
    if logit_bias is not None:
        logits_ab, logits_ba = logits_ab + logit_bias, logits_ba + logit_bias
    rows, cols = _rows_cols(valid, ctx)
    if groups is None:
        labels = torch.arange(logits_ab.shape[0], device=a.device) + offset
        return 0.5 * (_masked_ce(logits_ab, labels, rows, cols, ctx) + _masked_ce(logits_ba, labels, rows, cols, ctx))
    positive = _positives(groups, ctx, offset, *logits_ab.shape, a.device)
    return 0.5 * (_masked_ce(logits_ab, positive, rows, cols, ctx) + _masked_ce(logits_ba, positive, rows, cols, ctx))


@LOSSES.register("siglip", example={"views": 1, "logit_bias": -10.0})
def siglip_loss(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    ctx: DistContext,
    valid: Tensor | None = None,
    groups: Tensor | None = None,
) -> Tensor:
    """Sigmoid loss (SigLIP): -sum log sigmoid(+-(s * a.b + bias)) over all pairs, / rows.

    ``groups`` (B,) int64: every pair of the same group id is a positive (+), not only the diagonal."""
    _check_flat("siglip", a, b)
    all_b = gather(b, ctx)
    rows = a if ctx.local_loss else gather(a, ctx)
    offset = ctx.rank * a.shape[0] if ctx.local_loss and ctx.world_size > 1 else 0
    logits = logit_scale * rows @ all_b.T
    if logit_bias is not None:
        logits = logits + logit_bias
    positive = _positives(groups, ctx, offset, *logits.shape, a.device)
    signs = positive.to(logits.dtype) * 2 - 1
    terms = -F.logsigmoid(signs * logits)
    row_ok, col_ok = _rows_cols(valid, ctx)
    if row_ok is None:
        return terms.sum() / rows.shape[0]
    return _masked_mean((terms * col_ok[None, :]).sum(1), row_ok, col_ok, logits, ctx)


@LOSSES.register("milnce", example={"views": 2, "logit_bias": None})
def milnce_loss(
    a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor | None, ctx: DistContext, valid: Tensor | None = None
) -> Tensor:
    """MIL-NCE (Miech et al. 2020) for K captions per clip: a (B, E) clips, b (B, K, E) captions.

    clip -> captions: -log(sum of exp over its own K captions / sum over all captions);
    caption -> clips: cross-entropy with the caption's own clip as the positive. Mean of the two.
    With K = 1 this is exactly ``clip``.
    """
    if b.dim() == 2:
        b = b.unsqueeze(1)
    k = b.shape[1]
    all_a, all_b = gather(a, ctx), gather(b, ctx)  # (WB, E), (WB, K, E)
    local = ctx.local_loss and ctx.world_size > 1
    rows_a, rows_b = (a, b) if local else (all_a, all_b)
    offset = ctx.rank * a.shape[0] if local else 0
    bias = 0.0 if logit_bias is None else logit_bias
    logits_ab = logit_scale * rows_a @ all_b.flatten(0, 1).T + bias  # (R, WB*K)
    logits_ba = logit_scale * rows_b.flatten(0, 1) @ all_a.T + bias  # (R*K, WB)
    owner = torch.arange(all_b.shape[0], device=a.device).repeat_interleave(k)  # caption column -> clip
    own = torch.arange(rows_a.shape[0], device=a.device) + offset
    row_ok, col_ok = _rows_cols(valid, ctx)
    raw = logits_ab
    if col_ok is not None:
        logits_ab = logits_ab.masked_fill(~col_ok[owner][None, :], torch.finfo(logits_ab.dtype).min)
        logits_ba = logits_ba.masked_fill(~col_ok[None, :], torch.finfo(logits_ba.dtype).min)
    positive = owner[None, :] == own[:, None]
    pos = logits_ab.masked_fill(~positive, torch.finfo(logits_ab.dtype).min).logsumexp(1)
    clip_to_text = logits_ab.logsumexp(1) - pos  # (R,)
    text_to_clip = F.cross_entropy(logits_ba, own.repeat_interleave(k), reduction="none").view(-1, k).mean(1)
    per_row = 0.5 * (clip_to_text + text_to_clip)
    return per_row.mean() if row_ok is None else _masked_mean(per_row, row_ok, col_ok, raw, ctx)


def takes_groups(kind: str) -> bool:
    """Whether loss ``kind`` takes several positives per row (its function has a ``groups`` argument)."""
    return "groups" in inspect.signature(LOSSES.get(kind).builder).parameters


def check_pairs(loss) -> None:
    """Every pair of ``loss.pairs`` names a registered loss kind, and one with ``positives`` a kind that
    takes several positives per row; ``ConfigError`` otherwise."""
    for i, pair in enumerate(loss.pairs):
        try:
            LOSSES.get(pair.kind)
        except RegistryError as exc:
            raise ConfigError(f"loss.pairs[{i}].kind: {exc}") from None
        if pair.positives and not takes_groups(pair.kind):
            many = ", ".join(k for k in LOSSES.names() if takes_groups(k))
            raise ConfigError(
                f"loss.pairs[{i}].positives: loss kind {pair.kind!r} takes one positive per row; "
                f"several positives need one of: {many}"
            )
