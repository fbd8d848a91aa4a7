"""Memory-efficient contrastive losses: the same values and gradients as ``clip`` and ``siglip``,
without the (rows x columns) logits matrix.

The logits of R rows (x, (R, E)) against C columns (y, (C, E)) are made ``ctx.block`` x ``ctx.block``
at a time, in forward and again in backward (recomputed, never stored), inside one autograd
function per loss. Peak memory for the loss is O(block^2 + (R + C) * E) instead of O(R * C): at a
global batch of 64k the dense (64k)^2 fp32 logits alone are 16 GiB, 64 MiB in 4096 blocks.

    ``clip_blockwise``   per row, ``logsumexp_j l_ij - l_i,label_i`` (a running log-sum-exp over column
                         blocks), both directions: the symmetric InfoNCE of ``clip``
    ``siglip_chunked``   per row, ``sum_j -log sigmoid(z_ij * l_ij)``, z = +1 on the positive, else -1:
                         the sigmoid loss of ``siglip``

Distributed use is that of the dense losses: negatives are all-gathered (features, (W*B, E): small),
under ``local_loss`` each rank scores only its own rows, and the masking of samples that lack a
modality is the same. So ``tests/dist/loss_parity.py`` checks both against one process in every
mode, and ``tests/test_losses.py`` checks them against the dense kinds in float64 (1e-6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpretrain.losses.contrastive import (
    LOSSES,
    DistContext,
    _check_flat,
    _masked_mean,
    _rows_cols,
    gather,
)


def _blocks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class _BlockwiseRowLoss(torch.autograd.Function):
    """Per-row loss (R,) of logits ``l = scale * x @ y.T + bias`` without storing ``l``.

    ``kind``: ``"ce"`` (cross-entropy with target column ``labels[i]``) or ``"sigmoid"`` (sum over
    columns of ``-log sigmoid(z * l)``, z = +1 at ``labels[i]``, -1 elsewhere). ``cols``: (C,) bool,
    True = the column takes part (a masked column leaves the softmax / the sum), or None."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, labels, cols, kind: str, block: int):  # type: ignore[override]
        per_row, lses = [], []
        for r0, r1 in _blocks(x.shape[0], block):
            if kind == "ce":
                lse = torch.stack([_masked(_block_logits(x, y, scale, bias, r0, r1, c0, c1), cols, c0, c1).logsumexp(1)
                                   for c0, c1 in _blocks(y.shape[0], block)]).logsumexp(0)  # fmt: skip
                target = scale * (x[r0:r1] * y[labels[r0:r1]]).sum(1) + (0.0 if bias is None else bias)
                if cols is not None:  # a masked target column: as the dense loss (its row is left out anyway)
                    target = torch.where(cols[labels[r0:r1]], target, torch.finfo(target.dtype).min)
                per_row.append(lse - target)
                lses.append(lse)
                continue
            acc = torch.zeros(r1 - r0, dtype=x.dtype, device=x.device)
            for c0, c1 in _blocks(y.shape[0], block):
                logits = _block_logits(x, y, scale, bias, r0, r1, c0, c1)
                terms = -F.logsigmoid(_signs(labels, r0, r1, c0, c1, logits) * logits)
                acc = acc + (terms if cols is None else terms * cols[None, c0:c1]).sum(1)
            per_row.append(acc)
        ctx.save_for_backward(x, y, scale, bias if bias is not None else scale.new_zeros(()), labels)
        ctx.kind, ctx.block, ctx.cols, ctx.has_bias = kind, block, cols, bias is not None
        ctx.lse = torch.cat(lses) if lses else None
        return torch.cat(per_row)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, y, scale, bias, labels = ctx.saved_tensors
        cols, block = ctx.cols, ctx.block
        b = bias if ctx.has_bias else None
        gx, gy = torch.zeros_like(x), torch.zeros_like(y)
        gscale, gbias = torch.zeros_like(scale), torch.zeros_like(bias)
        for r0, r1 in _blocks(x.shape[0], block):
            g = grad[r0:r1, None]
            for c0, c1 in _blocks(y.shape[0], block):
                dots = x[r0:r1] @ y[c0:c1].T
                logits = scale * dots + (0.0 if b is None else b)
                if ctx.kind == "ce":  # d/dl (lse - l_target) = softmax - onehot (masked columns: as dense)
                    p = torch.exp(_masked(logits, cols, c0, c1) - ctx.lse[r0:r1, None])
                    dl = p - _onehot(labels, r0, r1, c0, c1, p)
                else:  # d/dl -log sigmoid(z l) = -z sigmoid(-z l)
                    z = _signs(labels, r0, r1, c0, c1, logits)
                    dl = -z * torch.sigmoid(-z * logits)
                    if cols is not None:
                        dl = dl * cols[None, c0:c1]
                dl = dl * g
                gx[r0:r1] += scale * dl @ y[c0:c1]
                gy[c0:c1] += scale * dl.T @ x[r0:r1]
                gscale += (dl * dots).sum()
                gbias += dl.sum()
        return gx, gy, gscale, (gbias if ctx.has_bias else None), None, None, None, None


def _block_logits(x, y, scale, bias, r0, r1, c0, c1) -> Tensor:
    logits = scale * x[r0:r1] @ y[c0:c1].T
    return logits if bias is None else logits + bias


def _masked(logits: Tensor, cols: Tensor | None, c0: int, c1: int) -> Tensor:
    """Columns c0:c1 that ``cols`` masks set to the dtype's lowest value, as the dense ``clip`` does."""
    if cols is None:
        return logits
    return logits.masked_fill(~cols[None, c0:c1], torch.finfo(logits.dtype).min)


def _onehot(labels, r0, r1, c0, c1, like) -> Tensor:
    hit = labels[r0:r1, None] == torch.arange(c0, c1, device=like.device)[None, :]
    return hit.to(like.dtype)


def _signs(labels, r0, r1, c0, c1, like) -> Tensor:
    return 2.0 * _onehot(labels, r0, r1, c0, c1, like) - 1.0


def blockwise_rows(x, y, scale, bias, labels, cols, kind: str, block: int) -> Tensor:
    """Per-row loss (R,) of x (R, E) against y (C, E); see ``_BlockwiseRowLoss``."""
    bias_t = None if bias is None else torch.as_tensor(bias, dtype=x.dtype, device=x.device)
    return _BlockwiseRowLoss.apply(x, y, scale, bias_t, labels, cols, kind, block)


def _rows_and_columns(a: Tensor, b: Tensor, ctx: DistContext):
    """(rows a, rows b, all a, all b, label offset): rows local under ``local_loss``, else global."""
    all_a, all_b = gather(a, ctx), gather(b, ctx)
    if ctx.local_loss and ctx.world_size > 1:
        return a, b, all_a, all_b, ctx.rank * a.shape[0]
    return all_a, all_b, all_a, all_b, 0


@LOSSES.register("clip_blockwise", example={"views": 1, "logit_bias": None})
def clip_blockwise_loss(
    a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor | None, ctx: DistContext, valid: Tensor | None = None
) -> Tensor:
    """``clip`` (symmetric InfoNCE) computed in logits blocks of ``loss.block_size``: the same value and
    gradients, O(block^2) memory for the logits instead of O(rows x columns)."""
    _check_flat("clip_blockwise", a, b)
    rows_a, rows_b, all_a, all_b, offset = _rows_and_columns(a, b, ctx)
    labels = torch.arange(rows_a.shape[0], device=a.device) + offset
    row_ok, col_ok = _rows_cols(valid, ctx)
    ab = blockwise_rows(rows_a, all_b, logit_scale, logit_bias, labels, col_ok, "ce", ctx.block)
    ba = blockwise_rows(rows_b, all_a, logit_scale, logit_bias, labels, col_ok, "ce", ctx.block)
    if row_ok is None:
        return 0.5 * (ab.mean() + ba.mean())
    return 0.5 * (_masked_mean(ab, row_ok, col_ok, ab, ctx) + _masked_mean(ba, row_ok, col_ok, ba, ctx))


@LOSSES.register("siglip_chunked", example={"views": 1, "logit_bias": -10.0})
def siglip_chunked_loss(
    a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor | None, ctx: DistContext, valid: Tensor | None = None
) -> Tensor:
    """``siglip`` (sigmoid loss) computed in logits blocks of ``loss.block_size``: the same value and
    gradients without the rows x columns logits (the chunked SigLIP of big_vision and open_clip)."""
    _check_flat("siglip_chunked", a, b)
    rows_a, _, _, all_b, offset = _rows_and_columns(a, b, ctx)
    labels = torch.arange(rows_a.shape[0], device=a.device) + offset
    row_ok, col_ok = _rows_cols(valid, ctx)
    per_row = blockwise_rows(rows_a, all_b, logit_scale, logit_bias, labels, col_ok, "sigmoid", ctx.block)
    if row_ok is None:
        return per_row.sum() / rows_a.shape[0]
    return _masked_mean(per_row, row_ok, col_ok, per_row, ctx)
