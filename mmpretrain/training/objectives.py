"""Building and checking the run's objectives (``loss.objectives``); the objectives themselves are
registered in ``OBJECTIVES`` (``training.terms``) by ``training.distill``, ``training.self_distill``,
``training.masked_prediction`` and ``training.captioning``, imported here so that the registry is complete."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmpretrain.config.schema import LossConfig
from mmpretrain.config.strict import ConfigError, check_params, typed_params
from mmpretrain.models.contrastive import ContrastiveModel
from mmpretrain.training import captioning, distill, masked_prediction, self_distill  # noqa: F401  (register their objectives)
from mmpretrain.training.terms import OBJECTIVES, ObjectiveContext, Term

__all__ = ["OBJECTIVES", "Active", "Term", "build_objectives", "check_objectives"]


@dataclass
class Active:
    """A built objective of the run: its term, weight, first active step and name in the metrics."""

    term: Term
    weight: float
    start_step: int
    name: str
    prefix: str

    def active(self, step: int) -> bool:
        return step >= self.start_step

    @torch.no_grad()
    def teacher_outputs(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The teacher's outputs on ``batch``, under this objective's prefix (none without a teacher)."""
        if self.term.teacher is None:
            return {}
        return {self.prefix + k: v.detach() for k, v in self.term.teacher(model, batch).items()}

    def student_outputs(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The objective's own student outputs (with gradient), under its prefix."""
        if self.term.student is None:
            return {}
        return {self.prefix + k: v for k, v in self.term.student(model, batch).items()}

    def trainable(self) -> list[nn.Parameter]:
        m = self.term.modules
        return [] if m is None else [p for p in m.parameters() if p.requires_grad]


def build_objectives(
    loss: LossConfig,
    student: ContrastiveModel,
    steps: int,
    device: torch.device = torch.device("cpu"),
) -> list[Active]:
    """``loss.objectives`` built for a run of ``steps`` steps on ``device``; the state each carries is
    attached to ``student.extras`` (call this before loading weights and before wrapping the model)."""
    built = []
    for i, o in enumerate(loss.objectives):
        entry = OBJECTIVES.get(o.kind)
        params = typed_params(entry, o.params, f"loss.objectives[{i}]")
        prefix, key = f"teacher[{i}]/", f"objective{i}"
        term = entry.builder(params, ObjectiveContext(student.cfg, student, device, prefix, key, steps))
        if term.modules is not None:
            student.extras[key] = term.modules.to(device)
        name = o.kind if sum(x.kind == o.kind for x in loss.objectives) == 1 else f"{o.kind}[{i}]"
        built.append(Active(term, o.weight, round(o.start_frac * steps), name, prefix))
    return built


def check_objectives(loss: LossConfig) -> None:
    """Every objective names a registered kind with params that fit it, and a start in [0, 1)."""
    for i, o in enumerate(loss.objectives):
        check_params(OBJECTIVES, o.kind, o.params, f"loss.objectives[{i}]")
        if not 0.0 <= o.start_frac < 1.0:
            raise ConfigError(f"loss.objectives[{i}].start_frac must be in [0, 1), not {o.start_frac}")
