"""Distillation from a frozen teacher (open_clip's ``DistillClipLoss``), a registered objective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpretrain.config.strict import ConfigError
from mmpretrain.losses.contrastive import DistContext, _masked_mean, _pair_logits, _rows_cols, pair_valid
from mmpretrain.models.contrastive import ContrastiveModel
from mmpretrain.models.pretrained import _example_ours, load_pretrained
from mmpretrain.training.terms import OBJECTIVES, ObjectiveContext, Term
from mmpretrain.types import ImageSpec, mask_key

PROBE_TEXTS = (
    "a dog.",
    "Red-Eyed frog, 3!",
    "caf\u00e9 \u6f22 \U0001f600",
    "a photo of a dog on a red sofa near the sea",
)


@dataclass(frozen=True)
class DistillParams:
    teacher: str = ""  # a checkpoint reference, as model.pretrained takes (ours, open_clip, Hugging Face)
    a: str = "image"  # rows of the similarity matrices
    b: str = "text"  # columns


def _example_distill(folder: Path) -> dict:
    """A tiny teacher checkpoint (ours) in ``folder``: the tiny model's architecture, so the tiny student's."""
    return {"params": {"teacher": str(_example_ours(folder)[0])}, "batch": {}}


@OBJECTIVES.register("distill", config=DistillParams, example=_example_distill)
def distill(p: DistillParams, ctx: ObjectiveContext) -> Term:
    """Knowledge distillation from a frozen teacher (open_clip's ``DistillClipLoss``): the soft-target
    cross-entropy between the teacher's and the student's a->b and b->a similarity softmaxes, halved
    (the contrastive term is the pair's). The teacher reads the student's batch: its tokenizer must
    give the same tokens; images are resized and re-normalised to its input size when they differ."""
    if not p.teacher:
        raise ConfigError("loss.objectives: distill needs params.teacher (a checkpoint reference)")
    model = load_pretrained(p.teacher).to(ctx.device).eval().requires_grad_(False)
    adapt = {**_adapters(p.a, ctx.student, model), **_adapters(p.b, ctx.student, model)}
    ta, tb, ts = (ctx.prefix + k for k in (p.a, p.b, "logit_scale"))

    def fn(out: dict[str, Tensor], dist: DistContext) -> Tensor:
        return distill_loss(
            out[p.a], out[p.b], out["logit_scale"], out[ta], out[tb], out[ts], dist, pair_valid(out, p.a, p.b)
        )

    teacher = AdaptedTeacher(model, (p.a, p.b), adapt)
    return Term(fn, (p.a, p.b, "logit_scale", ta, tb, ts), teacher=lambda _, batch: teacher(batch), frozen=teacher)


class AdaptedTeacher(nn.Module):
    """A frozen model run on the student's batch: the ``inputs`` modalities (and masks), adapted."""

    def __init__(self, model: ContrastiveModel, inputs: tuple[str, ...], adapt: dict[str, Callable]):
        super().__init__()
        self.model, self.inputs, self.adapt = model, inputs, adapt

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        keys = [k for m in self.inputs if m in batch for k in (m, mask_key(m)) if k in batch]
        out = self.model({k: self.adapt[k](batch[k]) if k in self.adapt else batch[k] for k in keys})
        return {k: v for k, v in out.items() if not k.endswith("_valid")}


def distill_loss(
    a: Tensor, b: Tensor, scale: Tensor, ta: Tensor, tb: Tensor, tscale: Tensor, ctx: DistContext, valid=None
) -> Tensor:
    """-(softmax(teacher logits) * log_softmax(student logits)).sum(1).mean(), a->b and b->a halved."""
    s_ab, s_ba, _ = _pair_logits(a, b, scale, ctx)
    t_ab, t_ba, _ = _pair_logits(ta.to(a.dtype), tb.to(b.dtype), tscale.to(scale.dtype), ctx)
    rows, cols = _rows_cols(valid, ctx)
    terms = []
    for s, t in ((s_ab, t_ab), (s_ba, t_ba)):
        if cols is not None:
            low = torch.finfo(s.dtype).min
            s, t = s.masked_fill(~cols[None, :], low), t.masked_fill(~cols[None, :], low)
        per_row = -(t.softmax(dim=1) * s.log_softmax(dim=1)).sum(dim=1)
        terms.append(per_row.mean() if rows is None else _masked_mean(per_row, rows, cols, s, ctx))
    return 0.5 * (terms[0] + terms[1])


def _adapters(modality: str, student: ContrastiveModel, teacher: ContrastiveModel) -> dict[str, Callable]:
    """The student's ``modality`` inputs -> the teacher's, by batch key: none when their input specs
    agree; for images of another size or normalisation, a resize and re-normalisation; for text, the
    same tokens padded to a longer context; else a ``ConfigError``."""
    if modality not in teacher.towers:
        raise ConfigError(f"loss.objectives: the teacher has no {modality} tower (towers: {teacher.modalities})")
    mine, theirs = student.input_spec(modality), teacher.input_spec(modality)
    if isinstance(mine, ImageSpec) and isinstance(theirs, ImageSpec):
        return _image_adapter(modality, mine, theirs)
    if modality == "text":
        return _text_adapter(student, teacher)
    if mine == theirs:
        return {}
    raise ConfigError(f"loss.objectives: the teacher's {modality} input ({theirs}) differs from the student's ({mine})")


def _text_adapter(student: ContrastiveModel, teacher: ContrastiveModel) -> dict[str, Callable]:
    a, b = student.tokenizer()(list(PROBE_TEXTS)), teacher.tokenizer()(list(PROBE_TEXTS))
    la, lb = a["text"].shape[-1], b["text"].shape[-1]
    whole = ~a["text_mask"][:, -1].bool()  # the probes the student's context holds untruncated
    same = lb >= la and bool(whole.any()) and torch.equal(b["text"][whole, :la], a["text"][whole])
    if not (same and not b["text_mask"][whole, la:].bool().any()):
        raise ConfigError(
            "loss.objectives: the teacher's tokenizer gives other tokens than the student's (or a shorter "
            "context); distillation reads the student's text batch, so give the student the teacher's tokenizer"
        )
    if la == lb:
        return {}
    pad = b["text"][0, -1].item()  # the probe's first text is short: its last position is padding
    return {
        "text": lambda x: F.pad(x, (0, lb - la), value=pad),
        mask_key("text"): lambda x: F.pad(x, (0, lb - la), value=False),
    }


def _image_adapter(modality: str, mine: ImageSpec, theirs: ImageSpec) -> dict[str, Callable]:
    if (mine.size, mine.mean, mine.std) == (theirs.size, theirs.mean, theirs.std):
        return {}
    m0, s0 = torch.tensor(mine.mean).view(1, 3, 1, 1), torch.tensor(mine.std).view(1, 3, 1, 1)
    m1, s1 = torch.tensor(theirs.mean).view(1, 3, 1, 1), torch.tensor(theirs.std).view(1, 3, 1, 1)

    def adapt(x: Tensor) -> Tensor:
        raw = x * s0.to(x) + m0.to(x)
        if tuple(raw.shape[-2:]) != tuple(theirs.size):
            raw = F.interpolate(raw, size=tuple(theirs.size), mode="bicubic", antialias=True, align_corners=False)
        return (raw - m1.to(x)) / s1.to(x)

    return {modality: adapt}


# ------------------------------------------------------------------ the task's side
