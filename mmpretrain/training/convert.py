"""Rewrite a checkpoint in the other strategy's format, offline in one process: ``ddp``
(``model.safetensors``, optimizer moments in ``state.pt``) <-> ``fsdp`` (``sharded/``, a
``torch.distributed.checkpoint`` folder). Weights, moments, schedule, RNG and data positions carry
over unchanged, so a run resumed from the copy continues as it would from the original."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import yaml

from mmpretrain.config.loader import config_from_tree
from mmpretrain.models import build_model
from mmpretrain.models.layout import FORMAT, load_weights, verify_checkpoint, write_checksums
from mmpretrain.training.checkpoint import load_state
from mmpretrain.training.dist import DistInfo
from mmpretrain.training.optim import build_optimizer, build_scheduler
from mmpretrain.training.strategy import STRATEGIES
from mmpretrain.utils.io import atomic_dir

log = logging.getLogger(__name__)


def convert_checkpoint(src: str | Path, out: str | Path, to: str) -> Path:
    """Write checkpoint ``src`` (either format) to the folder ``out`` in the format of strategy ``to``
    (``ddp`` or ``fsdp``); ``out`` must not exist. Named ``step_XXXXXXXX`` inside a run's
    ``checkpoints/``, the copy is one of that run's checkpoints."""
    src, out = Path(src), Path(out)
    problem = verify_checkpoint(src)
    if problem is not None:
        raise ValueError(f"{src}: not a valid checkpoint ({problem})")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    strategy_cls = STRATEGIES.get(to).builder
    config_yaml = (src / "config.yaml").read_text(encoding="utf-8")
    cfg = config_from_tree(yaml.safe_load(config_yaml))
    state = load_state(src)
    model = build_model(cfg.model)
    load_weights(model, src)
    optimizer = build_optimizer(model, cfg.optim, cfg.model)
    build_scheduler(optimizer, cfg.optim, cfg.train.steps)  # its fields in the param groups, as in training
    one = DistInfo()
    STRATEGIES.get("ddp").builder(cfg, one).load_moments(model, optimizer, src, state)
    rest = {k: v for k, v in state.items() if k not in ("optimizer", "format", "step")}
    with atomic_dir(out) as tmp:
        extra = strategy_cls(cfg, one).write_weights(tmp, model, optimizer)
        torch.save({"format": FORMAT, "step": state["step"], **rest, **extra}, tmp / "state.pt")
        shutil.copyfile(src / "config.yaml", tmp / "config.yaml")
        write_checksums(tmp, int(state["step"]))
    log.info("wrote %s (%s format) from %s", out, to, src)
    return out
