"""AdamW with weight-decay groups and per-tower learning rates; warm-up + cosine schedule."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from mmpretrain.config.schema import ModelConfig, OptimConfig
from mmpretrain.config.strict import ConfigError


def layer_scales(model: nn.Module, model_cfg: ModelConfig) -> dict[int, float]:
    """Layer-wise LR decay (``towers.<m>.layer_decay``, open_clip's ``--visual-layer-decay``): id(parameter)
    -> ``decay ** (n - 1 - i)`` over the encoder's ``layer_groups()`` (n groups, input to output); the
    projection head outside the tower keeps 1.0."""
    scales: dict[int, float] = {}
    for modality, tower_cfg in model_cfg.towers.items():
        if tower_cfg.layer_decay is None:
            continue
        groups_of = getattr(model.towers[modality], "layer_groups", None)
        if groups_of is None:
            raise ConfigError(
                f"model.towers.{modality}.layer_decay: the {tower_cfg.encoder} encoder has no numbered layers"
            )
        groups = groups_of()
        for i, group in enumerate(groups):
            for p in group:
                scales.setdefault(id(p), tower_cfg.layer_decay ** (len(groups) - 1 - i))
    return scales


def param_groups(model: nn.Module, optim: OptimConfig, model_cfg: ModelConfig) -> list[dict]:
    """Groups by (tower lr multiplier x layer-decay scale, decay). No decay for tensors with ndim < 2
    (biases, norms, logit scale/bias), as CLIP. Frozen parameters are left out."""
    mult = {m: t.lr_mult for m, t in model_cfg.towers.items()}
    scale = layer_scales(model, model_cfg)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()  # a trunk shared by towers (model.shared_backbone) joins the first tower's group
    for module in (getattr(model, "towers", {}), getattr(model, "heads", {})):
        for modality, sub in module.items():
            for p in sub.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    groups.setdefault((mult[modality] * scale.get(id(p), 1.0), p.ndim >= 2), []).append(p)
    for p in model.parameters():  # model-level parameters: logit scale / bias
        if p.requires_grad and id(p) not in seen:
            groups.setdefault((1.0, p.ndim >= 2), []).append(p)
    return [
        {"params": ps, "lr": optim.lr * m, "lr_mult": m, "weight_decay": optim.weight_decay if decay else 0.0}
        for (m, decay), ps in sorted(groups.items(), key=lambda kv: kv[0])
        if m > 0
    ]


def build_optimizer(model: nn.Module, optim: OptimConfig, model_cfg: ModelConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, optim, model_cfg)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused or None)


def lr_factor(step: int, *, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up, then cosine (or constant)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    opt: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, optim=optim, total_steps=total_steps))


def restore_optimizer(
    opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, state: dict, load_moments=None
) -> None:
    """Load the optimizer's moments (``load_moments()``; default: ``state["optimizer"]``, the DDP
    format) and the schedule's position from a checkpoint ``state`` while
    keeping the hyperparameters of this run's config (lr, betas, weight decay, schedule): loaded as
    is, torch would silently restore the checkpoint's. With an unchanged config the result is the
    same as a plain load (the LR is recomputed by the same formula)."""
    configured = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    if load_moments is None:
        opt.load_state_dict(state["optimizer"])
    else:
        load_moments()
    for group, hyper in zip(opt.param_groups, configured):
        group.update(hyper)
    sched.load_state_dict(state["scheduler"])
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
    for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]
