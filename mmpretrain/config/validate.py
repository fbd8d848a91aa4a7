"""Semantic checks of a config against the registries, run before any work starts."""
from __future__ import annotations

from mmpretrain.config.schema import ExperimentConfig, ModelConfig
from mmpretrain.config.strict import ConfigError, from_dict
from mmpretrain.registry import RegistryError


def validate(cfg: ExperimentConfig) -> None:
    """Raise ``ConfigError`` naming the bad field and the valid choices."""
    from mmpretrain.data.ops import DATA_OPS
    from mmpretrain.losses import LOSSES

    validate_model(cfg.model)
    for section in ("ops", "eval_ops"):
        for i, spec in enumerate(getattr(cfg.data, section)):
            _typed(DATA_OPS, spec.op, spec.params, f"data.{section}[{i}]")
    for j, src in enumerate(cfg.data.sources):
        for i, spec in enumerate(src.ops or []):
            _typed(DATA_OPS, spec.op, spec.params, f"data.sources[{j}].ops[{i}]")
        if not src.weight > 0:
            raise ConfigError(f"data.sources[{j}].weight must be > 0")
    if cfg.data.sources and cfg.data.train:
        raise ConfigError("give either data.train or data.sources (a mixture), not both")
    for i, pair in enumerate(cfg.loss.pairs):
        where = f"loss.pairs[{i}]"
        try:
            LOSSES.get(pair.kind)
        except RegistryError as exc:
            raise ConfigError(f"{where}.kind: {exc}") from None
        for side in (pair.a, pair.b):
            if side not in cfg.model.towers:
                raise ConfigError(f"{where}: modality {side!r} has no tower. Towers: {', '.join(cfg.model.towers)}")
    if cfg.loss.local_loss and not cfg.loss.gather_with_grad:
        raise ConfigError("loss.local_loss=true needs loss.gather_with_grad=true: without it gradients are wrong")
    _check_eval(cfg)
    _check_numbers(cfg)


def validate_model(model: ModelConfig) -> None:
    """Towers name known modalities and encoders, with params that fit the encoder."""
    from mmpretrain.encoders import ENCODERS

    if not model.towers:
        raise ConfigError("model.towers is empty: name at least two modalities, e.g. image and text")
    for modality, tower in model.towers.items():
        if modality not in ENCODERS:
            raise ConfigError(f"model.towers.{modality}: unknown modality. Valid: {', '.join(sorted(ENCODERS))}")
        _typed(ENCODERS[modality], tower.encoder, tower.params, f"model.towers.{modality}")
    unknown = [m for m in model.shared_backbone if m not in model.towers]
    if unknown or len(model.shared_backbone) == 1:
        raise ConfigError(f"model.shared_backbone {model.shared_backbone}: name two or more of the towers "
                          f"({', '.join(model.towers)})")


def _typed(registry, name: str, params: dict, where: str) -> None:
    try:
        entry = registry.get(name)
    except RegistryError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if entry.config_cls is not None:
        from_dict(entry.config_cls, params, f"{where}.params")
    elif params:
        raise ConfigError(f"{where}.params: {name!r} takes no parameters")


def _check_eval(cfg: ExperimentConfig) -> None:
    """Evaluation sets fail at load, not at the first evaluation hours into a run."""
    from pathlib import Path

    from mmpretrain.eval.datasets import LAYOUTS
    from mmpretrain.eval.zeroshot import resolve_templates

    for i, spec in enumerate(cfg.eval.zeroshot):
        head, sep, root = spec.partition("=")
        layout = head.rpartition("@")[2]
        if not sep or layout not in LAYOUTS:
            raise ConfigError(f"eval.zeroshot[{i}]: {spec!r} must be [NAME@]LAYOUT=DIR with LAYOUT one of "
                              f"{', '.join(LAYOUTS.names())}")
        if not Path(root).is_dir():
            raise ConfigError(f"eval.zeroshot[{i}]: folder not found: {root}")
    if cfg.eval.zeroshot:
        try:
            resolve_templates(cfg.eval.templates)
        except ValueError as exc:
            raise ConfigError(f"eval.templates: {exc}") from None


def _check_numbers(cfg: ExperimentConfig) -> None:
    checks = [
        (cfg.model.embed_dim > 0, "model.embed_dim must be > 0"),
        (cfg.data.batch_size > 0, "data.batch_size must be > 0"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0"),
        (cfg.train.steps > 0, "train.steps must be > 0"),
        (cfg.train.accum_steps >= 1, "train.accum_steps must be >= 1"),
        (cfg.train.ckpt_every > 0, "train.ckpt_every must be > 0"),
        (cfg.train.keep_last >= 1, "train.keep_last must be >= 1"),
        (cfg.train.log_every > 0, "train.log_every must be > 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
