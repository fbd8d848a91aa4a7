"""A whole experiment checked before any work: the config's own checks (``config.validate``) and
those of the packages that own the registries it names (encoders, data ops, losses, evaluation sets).
``api.load_config`` and ``train`` go through here; ``config/`` itself imports nothing above it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmpretrain.config.loader import config_from_tree, load_tree
from mmpretrain.config.schema import ExperimentConfig
from mmpretrain.config.strict import ConfigError
from mmpretrain.config.validate import check_config
from mmpretrain.data.device import check_device_ops
from mmpretrain.data.ops import check_ops
from mmpretrain.eval.checks import check_eval
from mmpretrain.losses import check_pairs
from mmpretrain.models.contrastive import check_model
from mmpretrain.models.pretrained import with_pretrained
from mmpretrain.registry import RegistryError
from mmpretrain.training.objectives import check_objectives
from mmpretrain.training.strategy import STRATEGIES


def validate_experiment(cfg: ExperimentConfig) -> ExperimentConfig:
    """Raise ``ConfigError`` naming the bad field and the valid choices; returns ``cfg``."""
    check_config(cfg)
    check_model(cfg.model)
    check_ops(cfg.data.ops, "data.ops")
    for j, src in enumerate(cfg.data.sources):
        check_ops(src.ops or [], f"data.sources[{j}].ops")
    check_device_ops(cfg.data.device_ops, [cfg.data.ops, *(src.ops or [] for src in cfg.data.sources)])
    check_pairs(cfg.loss)
    check_objectives(cfg.loss)
    check_eval(cfg.eval)
    check_strategy(cfg)
    return cfg


def check_strategy(cfg: ExperimentConfig) -> None:
    """``train.strategy`` names a registered strategy; LoRA towers need an unsharded one."""
    try:
        strategy = STRATEGIES.get(cfg.train.strategy).builder
    except RegistryError as exc:
        raise ConfigError(f"train.strategy: {exc}") from None
    lora = [m for m, t in cfg.model.towers.items() if t.lora is not None]
    if lora and strategy.sharded:
        raise ConfigError(
            f"model.towers.{lora[0]}.lora: LoRA adapters train under an unsharded strategy (ddp), "
            f"not {cfg.train.strategy} (not supported yet)"
        )


def experiment_from_tree(tree: dict[str, Any]) -> ExperimentConfig:
    """A merged config tree -> a fully checked ``ExperimentConfig``; a ``model.pretrained`` checkpoint
    supplies the model section under what the tree sets (``models.pretrained.with_pretrained``)."""
    return validate_experiment(config_from_tree(with_pretrained(tree)))


def load_experiment(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """A layered YAML config with ``key=value`` overrides -> a fully checked ``ExperimentConfig``."""
    return experiment_from_tree(load_tree(path, overrides))
