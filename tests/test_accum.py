"""Gradient accumulation equals one large batch for contrastive losses (exactly, to 1e-5)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from mmpretrain.config.schema import LossConfig, LossPair
from mmpretrain.losses import LOSSES
from mmpretrain.models import build_model
from mmpretrain.training.task import ContrastiveTask


def batch_for(model, n, seed, views=1):
    """n images and, per image, ``views`` captions (text (n, L), or (n, K, L) for MIL-NCE)."""
    g = torch.Generator().manual_seed(seed)
    tok = model.tokenizer()([f"caption number {i} take {j} of {seed}" for i in range(n) for j in range(views)])
    if views > 1:
        tok = {k: v.view(n, views, -1) for k, v in tok.items()}
    return {"image": torch.randn(n, 3, 32, 32, generator=g), **tok}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", LOSSES.names())
@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_accumulation_matches_large_batch(tiny_model_cfg, kind, patch_dropout):
    """Every registered loss kind (its example says its views and bias): K micro-batches equal one batch."""
    import dataclasses

    example = LOSSES.get(kind).make_example()
    bias, views = example["logit_bias"], example["views"]

    towers = dict(tiny_model_cfg.towers)
    image = towers["image"]
    towers["image"] = dataclasses.replace(
        image, params={**image.params, "vision_cfg": {**image.params["vision_cfg"], "patch_dropout": patch_dropout}}
    )
    cfg = dataclasses.replace(tiny_model_cfg, towers=towers, logit_bias_init=bias)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    other = copy.deepcopy(model)
    task = ContrastiveTask(LossConfig(pairs=[LossPair("image", "text", kind)]))
    full = batch_for(model, 16, seed=1, views=views)
    micro = [{k: v[i : i + 4] for k, v in full.items()} for i in range(0, 16, 4)]

    # the large batch, with the same per-micro-batch RNG draws as the accumulated run
    torch.manual_seed(5)
    big = task.forward_backward(model, micro, autocast=contextlib.nullcontext) if patch_dropout else None
    if patch_dropout:
        # with randomness, compare against accumulation run twice from the same RNG state
        g_ref = grads(model)
        torch.manual_seed(5)
        task.forward_backward(other, micro, autocast=contextlib.nullcontext)
        for name, g in grads(other).items():
            torch.testing.assert_close(g, g_ref[name], atol=1e-6, rtol=1e-5)
        return
    big = task.forward_backward(model, [full], autocast=contextlib.nullcontext)
    acc = task.forward_backward(other, micro, autocast=contextlib.nullcontext)
    assert acc["loss"].item() == pytest.approx(big["loss"].item(), abs=1e-5)
    g_big, g_acc = grads(model), grads(other)
    assert set(g_big) == set(g_acc) and "logit_scale" in g_big
    for name in g_big:
        torch.testing.assert_close(
            g_acc[name], g_big[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
