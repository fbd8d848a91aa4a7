"""Masked prediction of an EMA teacher's patch features (TIPS / iBOT; SigLIP 2's last 20%).

The student's image tower sees each image with the patches the ``patch_mask`` data op chose replaced
by a learned mask token (``patch_tokens(batch, mask, mask_token)``, which the open_clip and timm vision transformers
have); a prototype head over its output patch tokens predicts, at the masked positions, the
teacher's centred and sharpened prototype distribution of the same patches seen unmasked. The
teacher is an exponential moving average of the student's image tower and patch head (DINO's cosine
momentum schedule), kept with its centre and the mask token in ``model.extras``: checkpointed, and
a resumed run continues bit-identically. The loss: the cross-entropy averaged over masked patches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmpretrain.config.strict import ConfigError
from mmpretrain.losses.contrastive import DistContext
from mmpretrain.training.self_distill import (
    PrototypeHead,
    TeacherHeadParams,
    _update_center,
    copy_params,
    ema_params,
    momentum_at,
)
from mmpretrain.training.terms import OBJECTIVES, ObjectiveContext, Term, extras_of, unwrap


@dataclass(frozen=True)
class MaskedPredictionParams(TeacherHeadParams):
    mask: str = "patch_mask"  # the batch key of the (B, patches) masks (the patch_mask op; SigLIP 2: ratio 0.5)


class PatchTeacher(nn.Module):
    """The EMA copy of the student's image tower and patch head, and the centre of its outputs."""

    def __init__(self, tower: nn.Module, head: PrototypeHead):
        super().__init__()
        self.tower, self.head = copy.deepcopy(tower).requires_grad_(False), copy.deepcopy(head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(head.prototypes.shape[0]))
        self.eval()

    def train(self, mode: bool = True) -> PatchTeacher:
        return super().train(False)  # a teacher always predicts as in evaluation (no dropout)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.tower.patch_tokens({"image": images}))  # (B, N, K)


class MaskedState(nn.Module):
    """What the model carries for the objective: the mask token, the student's patch head, the teacher."""

    def __init__(self, tower: nn.Module, head: PrototypeHead):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(tower.token_dim))
        self.head, self.teacher = head, PatchTeacher(tower, head)


def _example(folder: Path) -> dict:
    params = {"prototypes": 16, "hidden": 16, "bottleneck": 8}
    return {"params": params, "batch": {"patch_mask": lambda n: torch.rand(n, 16) < 0.5}}  # the tiny tower: 4 x 4


@OBJECTIVES.register("masked_prediction", config=MaskedPredictionParams, example=_example)
def masked_prediction(p: MaskedPredictionParams, ctx: ObjectiveContext) -> Term:
    """Masked prediction of an EMA teacher's patch features (TIPS / iBOT): the student sees ``ratio``
    of each image's patches masked and predicts, there, the teacher's prototype distribution of the
    unmasked image's patches. The image tower must be a vision transformer (open_clip or timm)."""
    tower = ctx.student.towers["image"] if "image" in ctx.student.towers else None
    if tower is None or not hasattr(tower, "patch_tokens"):
        raise ConfigError("loss.objectives: masked_prediction needs an image tower with patch tokens (open_clip, timm)")
    state = MaskedState(tower, PrototypeHead(tower.token_dim, p.hidden, p.bottleneck, p.prototypes))
    keys = {k: ctx.prefix + k for k in ("student", "mask", "patches")}
    pending: dict[str, Tensor] = {}

    def student(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mask, mine = _mask(batch, p, tower.num_patches), extras_of(model, ctx.name)
        tokens = unwrap(model).patch_tokens("image", {"image": batch["image"]}, mask, mine.mask_token)
        return {"student": mine.head(tokens), "mask": mask}

    def teacher(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mine = extras_of(model, ctx.name)
        pending["center"] = mine.teacher.center.clone()  # this step's, before its update
        return {"patches": mine.teacher(batch["image"])}

    def fn(out: dict[str, Tensor], dist_ctx: DistContext) -> Tensor:
        s, t, mask = out[keys["student"]].float(), out[keys["patches"]].float(), out[keys["mask"]]
        pending["mean"] = t.mean(dim=(0, 1)).detach()
        return masked_loss(s, t, mask, pending["center"], p.student_temp, p.teacher_temp, dist_ctx)

    def init(model: nn.Module) -> None:
        copy_params(_pairs(model, extras_of(model, ctx.name)))

    def after_step(model: nn.Module, step: int) -> None:
        mine, m = extras_of(model, ctx.name), momentum_at(step, ctx.steps, p.momentum, p.momentum_end)
        ema_params(_pairs(model, mine), m)
        if "mean" in pending:
            _update_center(mine.teacher.center, pending.pop("mean"), p.center_momentum)

    return Term(fn, tuple(keys.values()), teacher=teacher, student=student, modules=state, init=init,
                after_step=after_step)  # fmt: skip


def masked_loss(
    s: Tensor,
    t: Tensor,
    mask: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
    ctx: DistContext = DistContext(),
) -> Tensor:
    """s, t (B, N, K) student and teacher patch logits, mask (B, N): the mean over masked patches (of all
    ranks: each rank divides by the global count / world size, so DDP's average is the global mean)
    of -sum softmax((t - center) / teacher_temp) * log_softmax(s / student_temp)."""
    per_patch = -(F.softmax((t - center) / teacher_temp, dim=-1) * F.log_softmax(s / student_temp, dim=-1)).sum(-1)
    count = mask.sum().to(per_patch.dtype)
    if ctx.world_size > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / ctx.world_size
    return (per_patch * mask).sum() / count.clamp_min(1e-6)


def _mask(batch: dict[str, Tensor], p: MaskedPredictionParams, patches: int) -> Tensor:
    if p.mask not in batch:
        raise ValueError(f"masked_prediction: the batch has no {p.mask!r}; add the patch_mask data op")
    mask = batch[p.mask].bool()
    if mask.shape[1:] != (patches,):
        raise ValueError(f"masked_prediction: {p.mask} masks {tuple(mask.shape[1:])} patches; the tower has {patches}")
    return mask


def _pairs(model: nn.Module, mine: MaskedState):
    student = nn.ModuleList([unwrap(model).towers["image"], mine.head])
    teacher = nn.ModuleList([mine.teacher.tower, mine.teacher.head])
    return zip(teacher.parameters(), student.parameters(), strict=True)
