"""Typed, layered, strict experiment configuration (internal; use mmpretrain.api)."""

from mmpretrain.config.schema import (  # noqa: F401
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    LossPair,
    ModelConfig,
    OpSpec,
    OptimConfig,
    TowerConfig,
    TrainConfig,
)
