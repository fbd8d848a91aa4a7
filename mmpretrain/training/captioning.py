"""The captioning objective (CoCa, LocCa; SigLIP 2 trains it with the sigmoid loss from the start): the
teacher-forced cross-entropy of the model's captioning decoder (``model.decoder``, ``models.decoder``)
over every caption token, the end token included and padding left out.

Per token, like open_clip's ``CoCaLoss`` caption term (a parity test holds it to that). Under gradient
accumulation it is taken, as every term, over the merged outputs of all micro-batches: the mean over the
whole accumulated batch's tokens, as one large batch would give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from mmpretrain.config.strict import ConfigError
from mmpretrain.losses.contrastive import DistContext
from mmpretrain.models.decoder import IGNORE
from mmpretrain.training.terms import OBJECTIVES, ObjectiveContext, Term


@dataclass(frozen=True)
class CaptionParams:
    label_smoothing: float = 0.0  # cross_entropy's label smoothing (CoCa and LocCa use none)


def caption_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of (..., V) next-token logits against (...) labels, ``IGNORE`` left out."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )


def _example_caption(folder) -> dict:
    return {"params": {}, "batch": {}, "decoder": {"kind": "locca", "params": {"width": 32, "layers": 1, "heads": 2}}}


@OBJECTIVES.register("caption", config=CaptionParams, example=_example_caption)
def caption(params: CaptionParams, ctx: ObjectiveContext) -> Term:
    """Teacher-forced captioning loss of the model's decoder (model.decoder: coca or locca)."""
    if ctx.model.decoder is None:
        raise ConfigError("loss.objectives: caption trains the model's captioning decoder: set model.decoder")

    def fn(out: dict[str, Tensor], dist: DistContext) -> Tensor:
        return caption_loss(out["caption_logits"], out["caption_labels"], params.label_smoothing)

    return Term(fn, reads=("caption_logits", "caption_labels"))
