"""Self-distillation from an EMA teacher over global and local crops (SILC; SigLIP 2's last 20%).

The ``multi_crop`` data op gives each sample ``G`` global and ``L`` local crops (``image_crops``,
(G + L, 3, H, W), the global ones first). The student encodes every crop through the model and a
prototype head (DINO's: an MLP to a bottleneck, L2-normalised, cosine against ``prototypes``
learned vectors); the teacher, an exponential moving average of the student's image tower, image
head and prototype head, encodes the global crops. The loss is DINO's: for every (teacher global
crop g, student crop v != g) pair, the cross-entropy between the teacher's centred and sharpened
softmax ``softmax((t - center) / teacher_temp)`` and the student's ``log_softmax(s / student_temp)``,
averaged over the pairs; the centre is an EMA of the teacher's mean output (all ranks).

The teacher and the centre live in the model (``model.extras``), so checkpoints hold them and a
resumed run continues bit-identically; the teacher's momentum follows DINO's cosine schedule from
``momentum`` to ``momentum_end`` over the run, updated after every optimizer step from the first
(the prototype head learns only once the objective is active).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mmpretrain.config.strict import ConfigError
from mmpretrain.losses.contrastive import DistContext
from mmpretrain.training.terms import OBJECTIVES, ObjectiveContext, Term, extras_of, unwrap


@dataclass(frozen=True)
class TeacherHeadParams:
    """What the EMA-teacher objectives share: the prototype head, temperatures, centre and momentum."""

    prototypes: int = 1024  # outputs of the prototype head (DINO's K)
    hidden: int = 512  # the head's MLP width
    bottleneck: int = 128  # the head's L2-normalised bottleneck
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    momentum: float = 0.996  # the teacher's EMA momentum at the first step (cosine to momentum_end)
    momentum_end: float = 1.0


@dataclass(frozen=True)
class SelfDistillParams(TeacherHeadParams):
    crops: str = "image_crops"  # the batch key of the crops (the multi_crop op writes it)
    global_crops: int = 2  # the first G crops are global: the teacher encodes them
    modality: str = "image"  # the tower the crops are for


class PrototypeHead(nn.Module):
    """DINO's head: MLP -> L2-normalised bottleneck -> cosine similarity to ``k`` learned prototypes."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, k: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(k, bottleneck) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


class EmaTeacher(nn.Module):
    """The EMA copy of the student's ``modality`` tower, its head and the prototype head; the centre."""

    def __init__(self, tower: nn.Module, head: nn.Module, proto: PrototypeHead, modality: str):
        super().__init__()
        self.modality = modality
        self.tower, self.head, self.proto = (copy.deepcopy(m).requires_grad_(False) for m in (tower, head, proto))
        self.register_buffer("center", torch.zeros(proto.prototypes.shape[0]))
        self.eval()

    def train(self, mode: bool = True) -> EmaTeacher:
        return super().train(False)  # a teacher always predicts as in evaluation (no dropout)

    def forward(self, crops: Tensor) -> Tensor:
        """(B, G, 3, H, W) -> (B, G, K) prototype logits."""
        b, g = crops.shape[:2]
        z = self.head(self.tower({self.modality: crops.flatten(0, 1)}))
        return self.proto(F.normalize(z, dim=-1)).view(b, g, -1)


class SelfDistillState(nn.Module):
    """What the model carries for the objective (``model.extras``): the student's prototype head and
    the teacher."""

    def __init__(self, proto: PrototypeHead, teacher: EmaTeacher):
        super().__init__()
        self.proto, self.teacher = proto, teacher


def _example(folder: Path) -> dict:
    params = {"crops": "image_crops", "global_crops": 2, "prototypes": 16, "hidden": 16, "bottleneck": 8}
    return {"params": params, "batch": {"image_crops": lambda n: torch.randn(n, 3, 3, 32, 32)}}  # 2 global, 1 local


@OBJECTIVES.register("self_distill", config=SelfDistillParams, example=_example)
def self_distill(p: SelfDistillParams, ctx: ObjectiveContext) -> Term:
    """Self-distillation from an EMA teacher over global and local crops (SILC / DINO): the teacher's
    centred, sharpened prototype distribution of each global crop is the target of the student's
    on every other crop. Needs the multi_crop data op; the teacher is checkpointed in the model."""
    if p.modality not in ctx.student.towers:
        raise ConfigError(f"loss.objectives: self_distill: the model has no {p.modality} tower")
    if not 1 <= p.global_crops:
        raise ConfigError("loss.objectives: self_distill needs global_crops >= 1")
    proto = PrototypeHead(ctx.model.embed_dim, p.hidden, p.bottleneck, p.prototypes)
    teacher = EmaTeacher(ctx.student.towers[p.modality], ctx.student.heads[p.modality], proto, p.modality)
    student_key, teacher_key = ctx.prefix + "student", ctx.prefix + "global"
    pending: dict[str, Tensor] = {}

    def student(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        # (B, V, E) from the unwrapped model: a second forward through DDP would broadcast its buffers
        # in place under the first forward's graph; the gradients still reach DDP's hooks and are synced
        z = unwrap(model).encode(p.modality, {p.modality: _crops(batch, p)})
        return {"student": extras_of(model, ctx.name).proto(z)}

    def teacher_out(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"global": extras_of(model, ctx.name).teacher(_crops(batch, p)[:, : p.global_crops])}

    def fn(out: dict[str, Tensor], dist_ctx: DistContext) -> Tensor:
        s, t = out[student_key].float(), out[teacher_key].float()
        pending["mean"] = t.mean(dim=(0, 1)).detach()
        return dino_loss(s, t, pending["center"], p.student_temp, p.teacher_temp)

    def init(model: nn.Module) -> None:
        state = extras_of(model, ctx.name)
        copy_params(_pairs(state.teacher, model, state.proto, p.modality))

    def after_step(model: nn.Module, step: int) -> None:
        state = extras_of(model, ctx.name)
        m = momentum_at(step, ctx.steps, p.momentum, p.momentum_end)
        ema_params(_pairs(state.teacher, model, state.proto, p.modality), m)
        if "mean" in pending:
            _update_center(state.teacher.center, pending.pop("mean"), p.center_momentum)

    def teacher_with_center(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        pending["center"] = extras_of(model, ctx.name).teacher.center.clone()  # this step's, before its update
        return teacher_out(model, batch)

    return Term(
        fn,
        (student_key, teacher_key),
        teacher=teacher_with_center,
        student=student,
        modules=SelfDistillState(proto, teacher),
        init=init,
        after_step=after_step,
    )


def dino_loss(s: Tensor, t: Tensor, center: Tensor, student_temp: float, teacher_temp: float) -> Tensor:
    """s (B, V, K) student logits, t (B, G, K) teacher logits of the first G crops: the mean over every
    (g, v != g) of -sum softmax((t_g - center) / teacher_temp) * log_softmax(s_v / student_temp)."""
    targets = F.softmax((t - center) / teacher_temp, dim=-1)
    logp = F.log_softmax(s / student_temp, dim=-1)
    terms = [
        -(targets[:, g] * logp[:, v]).sum(-1).mean() for g in range(t.shape[1]) for v in range(s.shape[1]) if v != g
    ]
    return torch.stack(terms).mean()


def momentum_at(step: int, steps: int, start: float, end: float) -> float:
    """DINO's schedule: ``end - (end - start) * (cos(pi * step / steps) + 1) / 2``."""
    return end - (end - start) * (math.cos(math.pi * min(step, steps) / max(steps, 1)) + 1) / 2


def _crops(batch: dict[str, Tensor], p: SelfDistillParams) -> Tensor:
    if p.crops not in batch:
        raise ValueError(f"self_distill: the batch has no {p.crops!r}; add the multi_crop data op")
    return batch[p.crops]


def _pairs(teacher: EmaTeacher, model: nn.Module, proto: PrototypeHead, modality: str):
    student = nn.ModuleList([model.towers[modality], model.heads[modality], proto])
    mine = nn.ModuleList([teacher.tower, teacher.head, teacher.proto])
    return zip(mine.parameters(), student.parameters(), strict=True)


@torch.no_grad()
def copy_params(pairs) -> None:
    """Each (teacher, student) parameter pair: the teacher takes the student's values."""
    for t, s in pairs:
        t.copy_(_whole(s))


@torch.no_grad()
def ema_params(pairs, m: float) -> None:
    """Each (teacher, student) parameter pair: teacher = m * teacher + (1 - m) * student. Under FSDP the
    student's parameters are shards (DTensor) and the teacher is whole on every rank: each is gathered."""
    for t, s in pairs:
        t.mul_(m).add_(_whole(s.detach()), alpha=1 - m)


def _whole(x: Tensor) -> Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


@torch.no_grad()
def _update_center(center: Tensor, batch_mean: Tensor, momentum: float) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        batch_mean = batch_mean.clone()
        dist.all_reduce(batch_mean)
        batch_mean /= dist.get_world_size()
    center.mul_(momentum).add_(batch_mean.to(center), alpha=1 - momentum)
