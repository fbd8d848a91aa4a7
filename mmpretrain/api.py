"""The public surface of mmpretrain. Everything else is internal and may change.

    >>> from mmpretrain import api
    >>> cfg = api.load_config("configs/experiment/smoke.yaml", ["train.steps=50"])
    >>> run_dir = api.train(cfg)
    >>> model = api.load_checkpoint(run_dir / "checkpoints")     # newest checkpoint
    >>> emb = api.encode(model, "text", api.tokenize(model, ["a red circle"]))  # (1, E)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from mmpretrain.config.loader import config_from_tree, load_config
from mmpretrain.config.schema import DataConfig, ExperimentConfig, ModelConfig
from mmpretrain.config.strict import ConfigError, from_dict
from mmpretrain.data.shards import Manifest, ShardWriterConfig, make_shards
from mmpretrain.models.contrastive import ContrastiveModel
from mmpretrain.types import Batch

__all__ = [
    "ConfigError", "ContrastiveModel", "DataConfig", "ExperimentConfig", "Manifest", "ModelConfig",
    "ShardWriterConfig", "create_model", "encode", "list_encoders", "load_checkpoint", "load_config",
    "make_shards", "tokenize", "train",
]


def create_model(config: ModelConfig | dict[str, Any] | str | Path, *, pretrained: str | Path | None = None) -> ContrastiveModel:
    """Build a model from a ``ModelConfig``, a ``model:`` mapping, or a YAML file with a
    ``model:`` section; ``pretrained`` loads weights from one of our checkpoints."""
    if isinstance(config, (str, Path)):
        config = load_config(config).model
    elif isinstance(config, dict):
        config = config_from_tree({"model": config}).model
    model = ContrastiveModel(config)
    if pretrained is not None:
        from mmpretrain.training.checkpoint import load_weights

        load_weights(model, _checkpoint_path(Path(pretrained)))
    return model.eval()


def load_checkpoint(path: str | Path) -> ContrastiveModel:
    """A model from a checkpoint directory (or a run's ``checkpoints/`` dir: its newest)."""
    ckpt = _checkpoint_path(Path(path))
    cfg = load_config(ckpt / "config.yaml")
    return create_model(cfg.model, pretrained=ckpt)


def _checkpoint_path(path: Path) -> Path:
    from mmpretrain.training.checkpoint import find_latest

    if (path / "model.safetensors").is_file() or path.suffix == ".safetensors":
        return path
    for root in (path, path.parent):
        latest = find_latest(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint at {path} (expected model.safetensors or checkpoints/step_*)")


def tokenize(model: ContrastiveModel, texts: Iterable[str]) -> Batch:
    """Texts -> ``{"text": (B, L) int64, "text_mask": (B, L) bool, True = real token}``."""
    texts = list(texts)
    if not texts:
        raise ValueError("tokenize: no texts given")
    return model.tokenizer()(texts)


@torch.no_grad()
def encode(model: ContrastiveModel, modality: str, batch: Batch, *, normalize: bool = True) -> Tensor:
    """Embed ``batch[modality]`` -> (B, E), L2-normalised unless ``normalize=False``."""
    if modality not in model.towers:
        raise ValueError(f"model has no {modality!r} tower (towers: {', '.join(model.modalities)})")
    device = next(model.parameters()).device
    return model.encode(modality, {k: v.to(device) for k, v in batch.items()}, normalize=normalize)


def train(config: ExperimentConfig | str | Path, overrides: Iterable[str] = ()) -> Path:
    """Train (or resume, with ``train.resume=latest``); returns the run directory."""
    from mmpretrain.training.run import train as _train

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    return _train(cfg)


def list_encoders() -> dict[str, list[str]]:
    """Registered encoder names per modality."""
    from mmpretrain.encoders import ENCODERS

    return {m: reg.names() for m, reg in ENCODERS.items()}


def data_config(**fields: Any) -> DataConfig:
    """A validated ``DataConfig`` from keyword fields."""
    return from_dict(DataConfig, fields, "data")
