"""The checks a config can make of itself, before any work starts: numbers in range, sections that
agree with each other. Checks against the registries (encoders, data ops, losses, evaluation sets)
belong to the packages that own them (``check_model``, ``check_ops``, ``check_pairs``,
``check_eval``); ``training.validate`` runs all of them. ``config/`` imports nothing above it.
"""

from __future__ import annotations

from mmpretrain.config.schema import ExperimentConfig, ModelConfig
from mmpretrain.config.strict import ConfigError
from mmpretrain.types import MODALITIES


def check_config(cfg: ExperimentConfig) -> None:
    """Raise ``ConfigError`` naming the bad field."""
    check_model_shape(cfg.model)
    for j, src in enumerate(cfg.data.sources):
        if not src.weight > 0:
            raise ConfigError(f"data.sources[{j}].weight must be > 0")
    if cfg.data.sources and cfg.data.train:
        raise ConfigError("give either data.train or data.sources (a mixture), not both")
    for i, pair in enumerate(cfg.loss.pairs):
        for side in (pair.a, pair.b):
            if side not in cfg.model.towers:
                raise ConfigError(
                    f"loss.pairs[{i}]: modality {side!r} has no tower. Towers: {', '.join(cfg.model.towers)}"
                )
    if cfg.loss.block_size < 1:
        raise ConfigError(f"loss.block_size must be >= 1, not {cfg.loss.block_size}")
    if cfg.loss.local_loss and not cfg.loss.gather_with_grad:
        raise ConfigError("loss.local_loss=true needs loss.gather_with_grad=true: without it gradients are wrong")
    _check_numbers(cfg)


def check_model_shape(model: ModelConfig) -> None:
    """Towers exist and name known modalities (``types.MODALITIES``); a shared backbone names two or more."""
    if not model.towers:
        raise ConfigError("model.towers is empty: name at least two modalities, e.g. image and text")
    for modality in model.towers:
        if modality not in MODALITIES:
            raise ConfigError(f"model.towers.{modality}: unknown modality. Valid: {', '.join(sorted(MODALITIES))}")
    for modality, tower in model.towers.items():
        if tower.lora is not None and (tower.freeze or tower.trainable_layers is not None):
            raise ConfigError(
                f"model.towers.{modality}: lora adapts a frozen encoder itself; drop freeze/trainable_layers"
            )
        if tower.lora is not None and (tower.lora.r < 1 or not 0 <= tower.lora.dropout < 1):
            raise ConfigError(f"model.towers.{modality}.lora: r must be >= 1 and dropout in [0, 1)")
        if tower.layer_decay is not None and not 0 < tower.layer_decay <= 1:
            raise ConfigError(f"model.towers.{modality}.layer_decay must be in (0, 1], got {tower.layer_decay}")
    unknown = [m for m in model.shared_backbone if m not in model.towers]
    if unknown or len(model.shared_backbone) == 1:
        raise ConfigError(
            f"model.shared_backbone {model.shared_backbone}: name two or more of the towers ({', '.join(model.towers)})"
        )


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
