"""Starting towers from other checkpoints (``model.towers.<m>.init_from``), at the start of a fresh run.

For each tower with ``init_from``: when the checkpoint has a tower of the same modality, its
weights are copied (strict); otherwise a video tower is inflated from the checkpoint's timm ViT
image tower (``ViViT.inflate_from_image``: patch embedding -> tubelet, CLS, positions resampled to
the new grid, spatial blocks). Heads are not copied. A resumed run or a loaded model never
reads ``init_from``: their own checkpoint holds the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from mmpretrain.config.schema import ModelConfig
from mmpretrain.config.strict import ConfigError

log = logging.getLogger(__name__)
IMAGE_TRUNK = "towers.image.trunk."  # the timm_vision tower's model in our checkpoints


def weights_file(source: str | Path) -> Path:
    """``model.safetensors`` of our checkpoint ``source`` (as ``resolve_checkpoint`` reads it: a step
    folder, or a run's newest valid checkpoint), or a ``.safetensors`` file given directly."""
    from mmpretrain.errors import CheckpointError
    from mmpretrain.models.pretrained import resolve_checkpoint

    if Path(source).is_file():
        return Path(source)
    try:
        return resolve_checkpoint(source, formats={"mmpretrain"}).path / "model.safetensors"
    except (FileNotFoundError, CheckpointError, ConfigError) as exc:
        raise ConfigError(
            f"init_from {source}: no model.safetensors there ({exc}); give a checkpoint directory, "
            "a run's checkpoints/ folder, or a .safetensors file"
        ) from None


def init_tower(model: nn.Module, modality: str, source: str | Path) -> list[str]:
    """Initialise ``model.towers[modality]`` from ``source``; returns the tensor names loaded."""
    from safetensors.torch import load_file

    state = load_file(str(weights_file(source)))
    tower, own = model.towers[modality], f"towers.{modality}."
    same = {k[len(own) :]: v for k, v in state.items() if k.startswith(own)}
    if same:
        tower.load_state_dict(same, strict=True)
        return sorted(same)
    inflate = getattr(tower, "inflate_from_image", None)
    if inflate is None or not any(k.startswith(IMAGE_TRUNK) for k in state):
        raise ConfigError(
            f"model.towers.{modality}.init_from {source}: the checkpoint has no {modality} tower"
            + (" and no timm ViT image tower to inflate" if inflate is not None else "")
        )
    try:
        return inflate(state, IMAGE_TRUNK)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"model.towers.{modality}.init_from {source}: cannot inflate its image tower into this "
            f"video tower ({exc}); widths, heads and patch size must match"
        ) from None


def init_towers(model: nn.Module, cfg: ModelConfig) -> dict[str, int]:
    """Apply every tower's ``init_from``; returns the number of tensors loaded per modality."""
    done = {}
    for modality, tower_cfg in cfg.towers.items():
        if tower_cfg.init_from:
            done[modality] = len(init_tower(model, modality, tower_cfg.init_from))
            log.info("tower %s: %d tensors from %s", modality, done[modality], tower_cfg.init_from)
    return done
