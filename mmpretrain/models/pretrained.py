"""Building models from names and loading pretrained weights offline, by checkpoint format.

Names: an open_clip model config (``ViT-B-32``), ``local-dir:PATH`` (an open_clip folder with
``open_clip_config.json``), one of our YAML configs, a ``model:`` mapping or a ``ModelConfig``.
Pretrained: our checkpoint directories, open_clip ``.pt``/``.bin``/``.safetensors`` files and
folders, Hugging Face CLIP/SigLIP folders. Preprocessing and tokenizer come from the checkpoint's
own config. No network.

``resolve_checkpoint`` is the one place that decides which checkpoint a reference means (a run
folder, its ``checkpoints/``, a ``step_*`` folder, an open_clip file or folder, a Hugging Face
folder, with or without ``local-dir:``); loading, fine-tuning (``init_from``) and resuming use it.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_model

from mmpretrain.config.loader import deep_merge, load_config
from mmpretrain.config.schema import ModelConfig
from mmpretrain.config.strict import ConfigError, from_dict, to_dict
from mmpretrain.encoders.hf_clip import FAMILIES, hf_model_type, tiny_folder
from mmpretrain.encoders.openclip import TINY_TEXT, TINY_VISION
from mmpretrain.errors import CheckpointError
from mmpretrain.models.contrastive import ContrastiveModel, check_model
from mmpretrain.models.formats import (
    CHECKPOINT_FORMATS,
    OPEN_CLIP_CONFIG,
    CheckpointFormat,
    export_open_clip,
    is_native,
    load_open_clip_state,
    native_format,
    open_clip_model_config,
)
from mmpretrain.models.layout import (
    find_latest,
    has_weights,
    list_checkpoints,
    load_weights,
    verify_checkpoint,
    write_checksums,
)

LOCAL_DIR = "local-dir:"  # open_clip's spelling of "this folder"


def local_dir(ref: Any) -> Path | None:
    """The folder of a ``local-dir:PATH`` reference, or None when ``ref`` has no such prefix."""
    text = str(ref)
    return Path(text[len(LOCAL_DIR) :]) if text.startswith(LOCAL_DIR) else None


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint reference resolved: its registered format and the path to load."""

    format: str
    path: Path


def resolve_checkpoint(ref: str | Path, *, formats: Collection[str] | None = None) -> ResolvedCheckpoint:
    """Which checkpoint ``ref`` means. A path of a registered format is itself (ours must pass its
    checksums); otherwise ``ref`` is a run folder or its ``checkpoints/`` and means the newest
    checkpoint that passes its checksums. ``formats`` restricts what is acceptable.

    Raises:
        FileNotFoundError: nothing there. CheckpointError: only broken checkpoints there.
        ConfigError: a checkpoint of a format not in ``formats``.
    """
    path = local_dir(ref) or Path(ref)
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {path} (expected one of our checkpoints or checkpoints/step_*, "
            "an open_clip folder or weights file, or a Hugging Face CLIP/SigLIP folder)"
        )
    name = detect_format(path)
    if is_native(name):
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem} (a run's checkpoints/ folder gives its newest valid checkpoint)")
    elif name is None:
        run = path.parent if path.name == "checkpoints" else path
        latest = find_latest(run)
        if latest is None:
            if list_checkpoints(run):
                raise CheckpointError(f"{run}: none of its checkpoints passes its checksums")
            raise FileNotFoundError(
                f"no checkpoint at {path} (not a known checkpoint format, and no checkpoints/step_* under it)"
            )
        name, path = native_format(), latest
    if formats is not None and name not in formats:
        raise ConfigError(f"{ref}: a {name} checkpoint; expected {' or '.join(sorted(formats))}")
    return ResolvedCheckpoint(name, path)


def model_config(spec: ModelConfig | dict[str, Any] | str | Path) -> ModelConfig:
    """Resolve a model spec (see module doc) to a validated ``ModelConfig``."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, dict):
        return model_config_from_tree(spec)
    text = str(spec)
    if local_dir(text) is not None:
        return _open_clip_dir_config(local_dir(text))
    if Path(text).suffix in (".yaml", ".yml") or Path(text).is_file():
        model = load_config(text).model
        check_model(model)
        return model

    named = open_clip.get_model_config(text)
    if named is None:
        raise ConfigError(
            f"unknown model {text!r}: not a YAML file, 'local-dir:' folder or open_clip model. "
            f"open_clip models: {', '.join(open_clip.list_models())}"
        )
    return model_config_from_tree(open_clip_model_config(named))


def model_config_from_tree(tree: dict[str, Any]) -> ModelConfig:
    """A ``model:`` mapping -> validated ``ModelConfig`` (model checks only, no loss/data)."""

    cfg = from_dict(ModelConfig, tree, "model")
    check_model(cfg)
    return cfg


def _our_config(path: Path) -> ModelConfig:
    """The model section of our checkpoint's config (only the model: its data and evaluation settings
    may name folders long gone)."""
    tree = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    return model_config_from_tree(tree.get("model", {}))


def with_pretrained(tree: dict[str, Any]) -> dict[str, Any]:
    """A config tree whose ``model.pretrained`` names a checkpoint gets that checkpoint's model section
    (towers, embedding width, temperature, bias, preprocessing) with the tree's own ``model`` keys merged
    over it, so ``towers.image.freeze=true`` or another image size still apply. An open_clip weights
    file holds no architecture: ``model.architecture`` names it (or the tree gives the towers)."""

    model = tree.get("model") or {}
    ref = model.get("pretrained")
    if not ref:
        return tree
    if model.get("architecture"):
        base = model_config(model["architecture"])
    else:
        try:
            resolved = resolve_checkpoint(ref)
        except (FileNotFoundError, CheckpointError) as exc:
            towers = model.get("towers") or {}
            if towers and all(isinstance(t, dict) and t.get("encoder") for t in towers.values()):
                return tree  # a resolved config (resolved.yaml) holds the architecture already
            raise ConfigError(
                f"model.pretrained: {exc}. (Its architecture is read at every start; a run whose source is "
                "gone resumes from its own resolved.yaml, which holds the towers.)"
            ) from None
        base = CHECKPOINT_FORMATS.build(resolved.format).config(resolved.path)
        if base is None:
            towers = model.get("towers") or {}
            if towers and all(isinstance(t, dict) and t.get("encoder") for t in towers.values()):
                return tree  # the config gives the whole architecture itself
            raise ConfigError(
                f"model.pretrained {ref}: a {resolved.format} holds no architecture; set model.architecture "
                "(an open_clip model name such as ViT-B-32, or a model YAML) or give model.towers in full "
                "(each with its encoder)"
            )
    merged = deep_merge(to_dict(base), model)
    return {**tree, "model": merged}


def _open_clip_dir_config(path: Path) -> ModelConfig:
    cfg_file = path / OPEN_CLIP_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no {OPEN_CLIP_CONFIG} in {path}")
    data = json.loads(cfg_file.read_text())
    return model_config_from_tree(open_clip_model_config(data["model_cfg"], data.get("preprocess_cfg")))


def _open_clip_dir_weights(path: Path) -> Path:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"no open_clip weights (open_clip_model.safetensors / open_clip_pytorch_model.bin) in {path}"
    )


def _load_ours(path: Path, base: ModelConfig | None) -> ContrastiveModel:
    """Our checkpoint (verified by ``resolve_checkpoint``): the model section of its config, its weights.
    Only the model is read: the run's data or evaluation settings (folders long gone) do not matter here."""
    model = ContrastiveModel(base or _our_config(path))
    load_weights(model, path)
    return model


def _load_open_clip_dir(path: Path, base: ModelConfig | None) -> ContrastiveModel:
    model = ContrastiveModel(_open_clip_dir_config(path))
    load_open_clip_state(model, _open_clip_dir_weights(path))
    return model


def _load_open_clip_file(path: Path, base: ModelConfig | None) -> ContrastiveModel:
    if base is None:
        raise ConfigError(
            f"{path}: an open_clip weights file needs the model it belongs to, "
            "e.g. create_model('ViT-B-32', pretrained=PATH)"
        )
    model = ContrastiveModel(base)
    load_open_clip_state(model, path)
    return model


def _hf_clip_config(path: Path) -> ModelConfig:
    cfg = json.loads((path / "config.json").read_text())
    if hf_model_type(path) == "clip":
        embed = cfg.get("projection_dim", 512)
    else:
        embed = cfg.get("text_config", {}).get("hidden_size", 768)
    scale, bias = _hf_scalars(path)
    tower = {"params": {"path": str(path)}, "head": "none"}
    tree = {
        "embed_dim": embed,
        "logit_scale_init": scale,
        "logit_scale_max": max(100.0, float(torch.tensor(scale).exp())),
        "towers": {"image": {"encoder": "hf_clip_vision", **tower}, "text": {"encoder": "hf_clip_text", **tower}},
    }
    if bias is not None:
        tree["logit_bias_init"] = bias
    return model_config_from_tree(tree)


HF_SCALARS = ("logit_scale", "logit_bias")


def _hf_scalars(path: Path) -> tuple[float, float | None]:
    """(logit_scale, logit_bias) stored in the folder's weights: ``model.safetensors`` or
    ``pytorch_model.bin``, or a sharded set of either (``model-0000x-of-0000y.safetensors``,
    ``pytorch_model-0000x-of-0000y.bin``), whose ``<name>.index.json`` names the shard of each tensor."""
    for single, read in (("model.safetensors", _safetensors_tensors), ("pytorch_model.bin", _bin_tensors)):
        index = path / f"{single}.index.json"
        if not ((path / single).is_file() or index.is_file()):
            continue
        where = _weight_map(index) if index.is_file() else {}
        files: dict[str, list[str]] = {}
        for key in HF_SCALARS:
            files.setdefault(where.get(key, single), []).append(key)
        found: dict[str, float] = {}
        for name, keys in files.items():  # each file read once
            if (path / name).is_file():
                found.update({k: float(v) for k, v in read(path / name, keys).items()})
            elif name != single:  # the index names a shard the folder lacks
                raise CheckpointError(f"{index} names {name} for {', '.join(keys)}, which is not in {path}")
        return found.get("logit_scale", 2.6592), found.get("logit_bias")
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (single or sharded with an index.json)")


def _weight_map(index: Path) -> dict[str, str]:
    """A sharded folder's ``weight_map`` (tensor -> shard file), each shard a file name in the folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a weight index (a JSON object with a weight_map): {exc}") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and v == Path(v).name and v not in ("", ".", "..") for v in weight_map.values()
    ):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names in the folder")
    return weight_map


def _safetensors_tensors(file: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in keys if k in f.keys()}


def _bin_tensors(file: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    try:  # mapped: only two scalars are read from what may be gigabytes
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a file from before torch's zip format cannot be mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: state[k] for k in keys if k in state}


def _load_hf_clip(path: Path, base: ModelConfig | None) -> ContrastiveModel:
    return ContrastiveModel(_hf_clip_config(path))  # each tower loads its half of the folder


def _is_hf_clip(path: Path) -> bool:
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False

    return hf_model_type(path) in FAMILIES


def _is_ours(path: Path) -> bool:
    return path.is_dir() and has_weights(path) and (path / "config.yaml").is_file()


def _register(name: str, detect, load, config, doc: str, example, *, native: bool = False) -> None:
    """Formats' ``detect`` predicates are mutually exclusive (a Hugging Face folder has ``config.json``
    and no ``config.yaml``; ours the reverse). ``config(path)``: the architecture it holds (or None).
    ``example(folder) -> (reference, base ModelConfig or None)`` writes a tiny checkpoint of the format
    for the generated tests."""
    CHECKPOINT_FORMATS.register(name, doc=doc, example=example, native=native)(
        lambda: CheckpointFormat(detect, load, config)
    )


def tiny_model() -> ContrastiveModel:
    """A tiny open_clip-architecture model (the encoders' registered examples), seeded."""

    torch.manual_seed(0)
    return ContrastiveModel(
        model_config_from_tree(
            {
                "embed_dim": 24,
                "towers": {
                    "image": {"encoder": "openclip_vision", "params": TINY_VISION},
                    "text": {"encoder": "openclip_text", "params": TINY_TEXT},
                },
            }
        )
    )


def _example_ours(folder: Path) -> tuple[Path, None]:
    model, ckpt = tiny_model(), Path(folder) / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    save_model(model, str(ckpt / "model.safetensors"))
    torch.save({"format": "mmpretrain-checkpoint/1", "step": 1}, ckpt / "state.pt")
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(model.cfg)}))
    write_checksums(ckpt, 1)
    return ckpt, None


def _example_open_clip_dir(folder: Path) -> tuple[str, None]:
    return f"{LOCAL_DIR}{export_open_clip(tiny_model(), Path(folder) / 'open_clip')}", None


def _example_open_clip_file(folder: Path) -> tuple[Path, ModelConfig]:
    model = tiny_model()
    return export_open_clip(model, Path(folder) / "open_clip") / "open_clip_model.safetensors", model.cfg


def _example_hf_clip(folder: Path) -> tuple[Path, None]:
    return Path(tiny_folder("clip")["path"]), None


_register(
    "hf_clip",
    _is_hf_clip,
    _load_hf_clip,
    _hf_clip_config,
    "a Hugging Face CLIP or SigLIP folder (config.json + weights)",
    _example_hf_clip,
)
_register(
    "mmpretrain",
    _is_ours,
    _load_ours,
    _our_config,
    "our checkpoint folder (model.safetensors, config.yaml, checksums)",
    _example_ours,
    native=True,
)
_register(
    "open_clip_dir",
    lambda p: p.is_dir() and (p / OPEN_CLIP_CONFIG).is_file(),
    _load_open_clip_dir,
    _open_clip_dir_config,
    "an open_clip folder (open_clip_config.json + weights), as our export writes it",
    _example_open_clip_dir,
)
_register(
    "open_clip_file",
    lambda p: p.is_file() and p.suffix in (".pt", ".pth", ".bin", ".safetensors"),
    _load_open_clip_file,
    lambda path: None,
    "an open_clip weights file (needs the model it belongs to)",
    _example_open_clip_file,
)


def detect_format(path: Path) -> str | None:
    """The name of the registered format whose files ``path`` has, or None."""
    return next((e.name for e in CHECKPOINT_FORMATS.entries() if e.builder().detect(path)), None)


def load_pretrained(ref: str | Path, base: ModelConfig | None = None) -> ContrastiveModel:
    """Load the checkpoint ``ref`` means (``resolve_checkpoint``) in its format."""
    resolved = resolve_checkpoint(ref)
    return CHECKPOINT_FORMATS.get(resolved.format).builder().load(resolved.path, base)


def create_model(
    name: ModelConfig | dict[str, Any] | str | Path, pretrained: str | Path | None = None
) -> ContrastiveModel:
    """``name``'s architecture (see ``model_config``), with ``pretrained``'s weights when given; a
    ``local-dir:`` name carries both."""
    if pretrained is None and local_dir(name) is not None:
        pretrained = name
    if pretrained is None:
        return ContrastiveModel(model_config(name))
    return load_pretrained(pretrained, None if local_dir(name) is not None else model_config(name))
