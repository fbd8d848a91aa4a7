"""Weight-decay groups, per-tower learning rates and the LR schedule."""

from __future__ import annotations

import dataclasses

import pytest

from mmpretrain.config.schema import OptimConfig
from mmpretrain.models import build_model
from mmpretrain.training.optim import build_optimizer, lr_factor


def test_no_decay_for_vectors_and_scalars(tiny_model_cfg):
    model = build_model(tiny_model_cfg)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.2), tiny_model_cfg)
    for group in opt.param_groups:
        for p in group["params"]:
            assert (group["weight_decay"] > 0) == (p.ndim >= 2)
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == len([p for p in model.parameters() if p.requires_grad])
    assert any(p is model.logit_scale for g in opt.param_groups for p in g["params"])


def test_tower_lr_mult_and_freeze(tiny_model_cfg):
    towers = dict(tiny_model_cfg.towers)
    towers["text"] = dataclasses.replace(towers["text"], lr_mult=0.1)
    cfg = dataclasses.replace(tiny_model_cfg, towers=towers)
    model = build_model(cfg)
    opt = build_optimizer(model, OptimConfig(lr=1e-3), cfg)
    text_params = {id(p) for p in model.towers["text"].parameters()}
    for g in opt.param_groups:
        if any(id(p) in text_params for p in g["params"]):
            assert g["lr"] == pytest.approx(1e-4)
    towers["text"] = dataclasses.replace(towers["text"], freeze=True)
    cfg = dataclasses.replace(tiny_model_cfg, towers=towers)
    model = build_model(cfg)
    opt = build_optimizer(model, OptimConfig(), cfg)
    assert not any(
        id(p) in {id(q) for q in model.towers["text"].parameters()} for g in opt.param_groups for p in g["params"]
    )


def test_schedule_warmup_then_cosine():
    o = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, optim=o, total_steps=110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55) and f[109] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(50, optim=dataclasses.replace(o, schedule="constant"), total_steps=110) == 1.0
