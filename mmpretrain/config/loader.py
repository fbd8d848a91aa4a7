"""Layered YAML configs: defaults <- base files (model, data) <- experiment <- CLI overrides.

A YAML file may name the files it builds on, relative to itself::

    # mmpretrain train configs/experiment/smoke.yaml
    base: [../model/tiny.yaml, ../data/toy.yaml]
    train: {steps: 200}

Mappings merge key by key; lists and scalars replace; a tower whose ``encoder`` changes
is replaced whole. The merged tree is converted
strictly into ``ExperimentConfig`` and then checked against the registries.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from mmpretrain.config.schema import ExperimentConfig
from mmpretrain.config.strict import ConfigError, from_dict, to_dict
from mmpretrain.config.validate import check_config
from mmpretrain.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Load a layered experiment config, apply ``key.sub=value`` overrides, and validate."""
    return config_from_tree(load_tree(path, overrides))


def load_tree(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The merged tree of a layered experiment config with ``key.sub=value`` overrides applied."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = load_yaml_tree(Path(path))
    for item in overrides:
        apply_override(tree, item)
    return tree


def config_from_tree(tree: dict[str, Any]) -> ExperimentConfig:
    """Strictly convert a merged tree and make the checks a config can make of itself (the checks
    against the registries are ``training.validate``'s)."""
    cfg = from_dict(ExperimentConfig, _drop_retired(tree))
    check_config(cfg)
    return cfg


# Keys this version no longer has, still present in older resolved configs and checkpoints:
# dropped with a warning, so those keep loading and resuming.
RETIRED = {("data", "eval_ops"): "evaluation inputs come from one recipe per modality (eval.inputs.EVAL_INPUTS)"}


def _drop_retired(tree: dict[str, Any]) -> dict[str, Any]:
    for (section, key), why in RETIRED.items():
        if isinstance(tree.get(section), dict) and key in tree[section]:
            log.warning("ignoring the retired key %s.%s: %s", section, key, why)
            tree = {**tree, section: {k: v for k, v in tree[section].items() if k != key}}
    return tree


def load_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` with its ``base:`` files merged underneath it."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in _seen:
        raise ConfigError(f"config files include each other: {' -> '.join(map(str, _seen + (path,)))}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    tree: dict[str, Any] = {}
    for base in bases:
        deep_merge(tree, load_yaml_tree(path.parent / base, _seen + (path,)))
    deep_merge(tree, data)
    return tree


def deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    """Merge ``src`` into ``dst`` in place: mappings recurse, everything else replaces.

    A tower whose ``encoder`` changes is replaced whole: the old encoder's params would
    not fit the new one.
    """
    for key, value in src.items():
        old = dst.get(key)
        switched = (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("encoder", old.get("encoder")) != old.get("encoder")
        )
        if isinstance(value, dict) and isinstance(old, dict) and not switched:
            deep_merge(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)
    return dst


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (``[1, 2]``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Write ``resolved.yaml`` (the exact config of this run) into ``run_dir``."""
    out = Path(run_dir) / "resolved.yaml"
    atomic_write_text(out, dump_config(cfg))
    return out
