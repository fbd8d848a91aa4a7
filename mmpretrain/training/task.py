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
from mmpretrain.losses.contrastive import pair_valid, scale_grad
from mmpretrain.training.objectives import Active
from mmpretrain.types import Batch

SHARED = ("logit_scale", "logit_bias")


class ContrastiveTask:
    """The loss graph: ``loss.pairs`` (contrastive terms) plus ``objectives`` (``training.objectives``,
    each active from its start step). ``fields``: batch keys the terms read besides the model's
    outputs (a pair's ``positives`` group ids), carried into the outputs."""

    def __init__(self, cfg: LossConfig, dist: DistContext = DistContext(), objectives: list[Active] | None = None):
        self.cfg, self.dist = cfg, dist
        self.terms = [(p, LOSSES.get(p.kind).builder) for p in cfg.pairs]
        self.objectives = list(objectives or [])
        self.fields = sorted({p.positives for p in cfg.pairs if p.positives})

    def losses(self, out: dict[str, Tensor], step: int = 0) -> dict[str, Tensor]:
        """``{"loss": weighted sum, "loss/a-b": each pair (detached), "loss/<objective>": each active
        objective}``. A pair is skipped when the batch lacks one of its modalities; samples lacking one
        (``"<m>_valid"`` False) are masked out of that pair's loss (see ``losses.contrastive``).
        """
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for i, (pair, fn) in enumerate(self.terms):
            if pair.a not in out or pair.b not in out:
                continue
            extra = {"groups": _field(out, pair.positives, f"loss.pairs[{i}].positives")} if pair.positives else {}
            value = fn(
                out[pair.a],
                out[pair.b],
                out["logit_scale"],
                out.get("logit_bias"),
                self.dist,
                pair_valid(out, pair.a, pair.b),
                **extra,
            )
            metrics[f"loss/{pair.a}-{pair.b}"] = value.detach()
            total = pair.weight * value if total is None else total + pair.weight * value
        if total is None:
            wanted = sorted({m for p, _ in self.terms for m in (p.a, p.b)})
            raise ValueError(f"batch has none of the loss pairs' modalities; has {sorted(out)}, pairs use {wanted}")
        for o in self.objectives:
            if o.active(step) and all(k in out for k in o.term.reads):
                value = o.term.fn(out, self.dist)
                metrics[f"loss/{o.name}"] = value.detach()
                total = total + o.weight * value
            elif params := o.trainable():  # a zero gradient: DDP expects one for every trainable parameter
                total = total + 0.0 * sum(p.sum() for p in params)
        return {"loss": total, **metrics}

    def outputs(self, model: nn.Module, batch: Batch, step: int = 0, *, teachers: bool = True) -> dict[str, Tensor]:
        """The model's outputs on ``batch``, the batch ``fields`` the terms read, and (``teachers``) the
        outputs of the active objectives' teachers."""
        out = model(batch)
        out.update({f: batch[f] for f in self.fields if f in batch})
        for o in self.objectives:
            if o.active(step):
                out.update(o.student_outputs(model, batch))
                if teachers:
                    out.update(o.teacher_outputs(model, batch))
        return out

    def after_step(self, model: nn.Module, step: int) -> None:
        """Each objective's update after optimizer step ``step`` (an EMA teacher's)."""
        for o in self.objectives:
            if o.term.after_step is not None:
                o.term.after_step(model, step)

    def forward_backward(
        self,
        model: nn.Module,
        micro: list[Batch],
        *,
        autocast: Callable[[], ContextManager],
        no_sync: Callable[[], ContextManager] = contextlib.nullcontext,
        step: int = 0,
    ) -> dict[str, Tensor]:
        """Backpropagate the loss of ``micro`` (one or more micro-batches) at optimizer step ``step`` (which
        objectives are active); returns detached losses."""
        if len(micro) == 1:
            with autocast():
                losses = self.losses(self.outputs(model, micro[0], step), step)
            losses["loss"].backward()
            return {k: v.detach() for k, v in losses.items()}
        states, cached = [], []
        with torch.no_grad():
            for batch in micro:
                states.append(_rng_state())
                with autocast():
                    cached.append({k: v for k, v in self.outputs(model, batch, step).items() if k not in SHARED})
        n = len(micro)
        for i, batch in enumerate(micro):
            _set_rng_state(states[i])
            with no_sync() if i < n - 1 else contextlib.nullcontext():
                with autocast():
                    out = self.outputs(model, batch, step, teachers=False)  # the teachers' outputs are cached
                    merged = {m: _merge(m, i, out, cached) for m in cached[i]}
                    merged.update({k: scale_grad(out[k], 1.0 / n) for k in SHARED if k in out})
                    losses = self.losses(merged, step)
                losses["loss"].backward()
        return {k: v.detach() for k, v in losses.items()}


def _merge(key: str, i: int, out: dict[str, Tensor], cached: list[dict[str, Tensor]]) -> Tensor:
    """Micro-batch ``i``'s fresh ``key`` (with gradient) among the others' cached ones, along the batch;
    a scalar (a teacher's temperature) is the same for all and taken as cached."""
    if cached[i][key].dim() == 0:
        return cached[i][key]
    return torch.cat([out[key] if j == i and key in out else c[key] for j, c in enumerate(cached)])


def _field(out: dict[str, Tensor], key: str, where: str) -> Tensor:
    if key not in out:
        raise ValueError(f"{where}: the batch has no {key!r}; add a data op that writes it (group_id writes 'group')")
    return out[key]


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
