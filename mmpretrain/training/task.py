"""The contrastive task: owns the loss graph and turns dict batches into losses and gradients.

Gradient accumulation is exact for contrastive losses (GradCache, as open_clip's
``accum_freq``): embeddings of all micro-batches are first computed without gradient, then
each micro-batch is re-encoded with gradient and the loss is taken over the *full*
accumulated batch with the others' cached embeddings. Two details make the result equal to
one large batch (tested): each re-encode replays the RNG state of its first pass, and the
gradient of the shared temperature/bias is divided by the number of micro-batches, since
every micro-step's loss contains the whole of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch
from torch import Tensor, nn

from mmpretrain.config.schema import LossConfig
from mmpretrain.losses import LOSSES, DistContext
from mmpretrain.losses.contrastive import scale_grad
from mmpretrain.types import Batch, valid_key

SHARED = ("logit_scale", "logit_bias")


class ContrastiveTask:
    def __init__(self, cfg: LossConfig, dist: DistContext = DistContext()):
        self.cfg, self.dist = cfg, dist
        self.terms = [(p, LOSSES.get(p.kind).builder) for p in cfg.pairs]

    def losses(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss": weighted sum, "loss/a-b": each term (detached)}`` for the pairs present.

        A pair is skipped when the batch lacks one of its modalities; samples lacking one
        (``"<m>_valid"`` False) are masked out of that pair's loss (see ``losses.contrastive``).
        """
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for pair, fn in self.terms:
            if pair.a not in out or pair.b not in out:
                continue
            value = fn(
                out[pair.a],
                out[pair.b],
                out["logit_scale"],
                out.get("logit_bias"),
                self.dist,
                pair_valid(out, pair.a, pair.b),
            )
            metrics[f"loss/{pair.a}-{pair.b}"] = value.detach()
            total = pair.weight * value if total is None else total + pair.weight * value
        if total is None:
            wanted = sorted({m for p, _ in self.terms for m in (p.a, p.b)})
            raise ValueError(f"batch has none of the loss pairs' modalities; has {sorted(out)}, pairs use {wanted}")
        return {"loss": total, **metrics}

    def forward_backward(
        self,
        model: nn.Module,
        micro: list[Batch],
        *,
        autocast: Callable[[], ContextManager],
        no_sync: Callable[[], ContextManager] = contextlib.nullcontext,
    ) -> dict[str, Tensor]:
        """Backpropagate the loss of ``micro`` (one or more micro-batches); returns detached losses."""
        if len(micro) == 1:
            with autocast():
                losses = self.losses(model(micro[0]))
            losses["loss"].backward()
            return {k: v.detach() for k, v in losses.items()}
        states, cached = [], []
        with torch.no_grad():
            for batch in micro:
                states.append(_rng_state())
                with autocast():
                    cached.append({k: v for k, v in model(batch).items() if k not in SHARED})
        n = len(micro)
        for i, batch in enumerate(micro):
            _set_rng_state(states[i])
            with no_sync() if i < n - 1 else contextlib.nullcontext():
                with autocast():
                    out = model(batch)
                    merged = {
                        m: torch.cat([out[m] if j == i else c[m] for j, c in enumerate(cached)]) for m in cached[i]
                    }
                    merged.update({k: scale_grad(out[k], 1.0 / n) for k in SHARED if k in out})
                    losses = self.losses(merged)
                losses["loss"].backward()
        return {k: v.detach() for k, v in losses.items()}


def pair_valid(out: dict[str, Tensor], a: str, b: str) -> Tensor | None:
    """(B,) bool, True = the sample has both ``a`` and ``b``; None when every sample has both."""
    flags = [out[valid_key(m)] for m in (a, b) if valid_key(m) in out]
    if not flags:
        return None
    return flags[0] & flags[1] if len(flags) == 2 else flags[0]


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
