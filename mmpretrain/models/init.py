"""Starting a fresh run from pretrained weights: the whole model (``model.pretrained``) and single
towers (``model.towers.<m>.init_from``), once, at the start of a fresh run.

``model.pretrained``: any checkpoint ``resolve_checkpoint`` knows (ours, an open_clip folder or
weights file, a Hugging Face CLIP/SigLIP folder) is loaded in its format and its whole state
(towers, heads, temperature, SigLIP bias) copied into the model, strictly: ``with_pretrained`` made
the config's architecture the checkpoint's, so only a config that changed the architecture fails.

``init_from``: the checkpoint's tower of the same modality is copied (strict); a tower that reads
foreign weights files itself (``load_weights_file``: timm towers read timm files) takes a file the
formats do not claim; otherwise a video tower is inflated from the checkpoint's timm ViT image tower
(``ViViT.inflate_from_image``: patch embedding -> tubelet, CLS, positions resampled to the new grid,
spatial blocks). Heads are not copied. A resumed run or a loaded model reads neither: their own
checkpoint holds the weights.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from mmpretrain.config.schema import ModelConfig
from mmpretrain.config.strict import ConfigError
from mmpretrain.errors import CheckpointError
from mmpretrain.models.formats import is_native
from mmpretrain.models.layout import read_weights
from mmpretrain.models.lora import load_canonical, merged, without_lora
from mmpretrain.models.pretrained import load_pretrained, local_dir, resolve_checkpoint

log = logging.getLogger(__name__)
IMAGE_TRUNK = "towers.image.trunk."  # the timm_vision tower's model in our checkpoints


def _our_state(source: str | Path, path: Path) -> dict[str, Tensor] | None:
    """The weights of our checkpoint (or of one of our ``model.safetensors`` files) ``source`` (at
    ``path``); None when it is another format."""

    if path.is_file():
        if path.suffix != ".safetensors":
            return None
        with safe_open(str(path), "pt") as f:  # with LoRA adapters: loaded as a model, merged (_loaded_state)
            ours = any(k.startswith("towers.") for k in f.keys()) and not any(".lora_" in k for k in f.keys())
        return load_file(str(path)) if ours else None
    resolved = resolve_checkpoint(source)
    state = read_weights(resolved.path) if is_native(resolved.format) else None
    return None if state is None or any(".lora_" in k for k in state) else state


def _loaded_state(source: str | Path, cfg: ModelConfig) -> dict[str, Tensor]:
    """``source`` in any format, loaded as a model (an open_clip weights file as this config's architecture,
    without adapters), its LoRA adapters (if it has any) merged."""

    return merged(load_pretrained(source, replace(without_lora(cfg), pretrained=None))).state_dict()


def init_tower(model: nn.Module, modality: str, source: str | Path, cfg: ModelConfig) -> list[str]:
    """Initialise ``model.towers[modality]`` from ``source``; returns the tensor names loaded."""

    tower, own = model.towers[modality], f"towers.{modality}."
    path = local_dir(source) or Path(source)
    try:
        state = _our_state(source, path)
        loader = getattr(tower, "load_weights_file", None)
        if state is None and loader is not None and path.is_file():
            return loader(path)
        if state is None:
            state = _loaded_state(source, cfg)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ConfigError(f"model.towers.{modality}.init_from {source}: {exc}") from None
    same = {k[len(own) :]: v for k, v in state.items() if k.startswith(own)}
    if same:
        load_canonical(tower, same, strict=True)  # a tower with adapters: onto their base layers
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


def init_pretrained(model: nn.Module, cfg: ModelConfig) -> int:
    """Copy ``cfg.pretrained``'s whole state into ``model`` (strict); returns the number of tensors."""
    try:
        state = _loaded_state(cfg.pretrained, cfg)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ConfigError(f"model.pretrained {cfg.pretrained}: {exc}") from None
    try:
        missing, unexpected = load_canonical(model, state, strict=False)
        problem = f"missing {missing[:4]}, unexpected {unexpected[:4]}" if missing or unexpected else None
    except RuntimeError as exc:  # shapes differ
        problem = str(exc).splitlines()[-1].strip()
    if problem:
        raise ConfigError(
            f"model.pretrained {cfg.pretrained}: the model this config describes differs from the checkpoint's "
            f"({problem}); leave the architecture to the checkpoint"
        )
    image = model.data_context().spec("image")
    if image is not None:
        log.info(
            "model.pretrained %s: image preprocessing size %s, mean %s, std %s, %s (from the checkpoint unless "
            "the config sets them)",
            cfg.pretrained,
            image.size,
            image.mean,
            image.std,
            image.interpolation,
        )
    return len(state)


def init_towers(model: nn.Module, cfg: ModelConfig) -> dict[str, int]:
    """Apply ``pretrained`` (under ``"model"``), then every tower's ``init_from``; returns the number of
    tensors loaded for each."""
    done = {}
    if cfg.pretrained:
        done["model"] = init_pretrained(model, cfg)
        log.info("model: %d tensors from %s", done["model"], cfg.pretrained)
    for modality, tower_cfg in cfg.towers.items():
        if tower_cfg.init_from:
            done[modality] = len(init_tower(model, modality, tower_cfg.init_from, cfg))
            log.info("tower %s: %d tensors from %s", modality, done[modality], tower_cfg.init_from)
    return done
