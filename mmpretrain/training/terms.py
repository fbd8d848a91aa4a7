"""Objectives beside the contrastive pairs: registered entries, configured as data (``loss.objectives``).

A pair (``loss.pairs``) contrasts two modalities' pooled embeddings; an objective is any other term of
the loss: it names the model outputs it reads, has a weight and is active from ``start_frac`` of the
run on (SigLIP 2 switches its last terms on for the final 20%). An objective may bring a frozen
``teacher``: a model the task runs on each batch (no gradient), whose outputs join the student's under
``teacher[<i>]/<key>`` for objective ``i``.

Under gradient accumulation a term is computed, like the pairs, on the merged outputs of every
micro-batch (the others' cached without gradient, the teacher's cached from the first pass), so the
accumulated gradient equals one large batch's (tested) for any term of the cached outputs.

Adding one: a function ``(params, ctx: ObjectiveContext) -> Term`` registered in ``OBJECTIVES`` with
its params dataclass and an example for the generated tests: ``example(folder) -> {"params": {...},
"batch": {key: make(n) -> (n, ...) tensor}}``, the batch keys it reads beside the tiny model's image
and text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmpretrain.config.schema import ModelConfig
from mmpretrain.losses.contrastive import DistContext
from mmpretrain.models.contrastive import ContrastiveModel
from mmpretrain.registry import Registry


@dataclass
class Term:
    """What an objective entry builds: ``fn(out, dist) -> ()`` over the outputs it ``reads``.

    Hooks, each optional: ``teacher(model, batch) -> outputs`` (no gradient; cached under accumulation)
    and ``student(model, batch) -> outputs`` (with gradient, through the possibly wrapped model), both
    joining the outputs under the objective's prefix; ``modules``: state the model carries for it
    (``model.extras[ctx.name]``: checkpointed, broadcast and trained with the model; trainable parameters
    join the optimizer), which hooks reach through the model they are given (``extras_of``);
    ``init(model)`` on a fresh run once the student's weights are final; ``after_step(model, step)``
    after each optimizer step (an EMA update); ``frozen``: a frozen model the term runs that the
    checkpoints do not hold (a distillation teacher, loaded again from its reference)."""

    fn: Callable[[dict[str, Tensor], DistContext], Tensor]
    reads: tuple[str, ...]
    teacher: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]] | None = None
    student: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]] | None = None
    modules: nn.Module | None = None
    init: Callable[[nn.Module], None] | None = None
    after_step: Callable[[nn.Module, int], None] | None = None
    frozen: nn.Module | None = None


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective may know of the run: the student's model config and input specs, the device,
    and its own key prefix for the teacher's outputs."""

    model: ModelConfig
    student: ContrastiveModel
    device: torch.device = torch.device("cpu")
    prefix: str = "teacher[0]/"  # the keys of its outputs
    name: str = "objective0"  # its entry in model.extras
    steps: int = 1  # the run's optimizer steps (train.steps)


OBJECTIVES: Registry[Term] = Registry("objective")


# ------------------------------------------------------------------ distillation from a frozen teacher


def unwrap(model: nn.Module) -> nn.Module:
    """The model a wrapper (DDP, torch.compile) holds, or ``model``."""
    while not hasattr(model, "extras"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def extras_of(model: nn.Module, name: str) -> nn.Module:
    """``model.extras[name]`` of a model or of the model a wrapper holds."""
    return unwrap(model).extras[name]
