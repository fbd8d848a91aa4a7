"""Checks of the evaluation settings (``eval.*``), run before training starts (``training.validate``):
an evaluation set that cannot be read fails at load, not at the first evaluation hours into a run."""

from __future__ import annotations

from pathlib import Path

from mmpretrain.config.schema import EvalConfig
from mmpretrain.config.strict import ConfigError


def check_eval(cfg: EvalConfig) -> None:
    """``eval.zeroshot`` sets are ``[NAME@]LAYOUT=DIR`` with a registered layout and an existing folder;
    ``eval.templates`` resolve."""
    from mmpretrain.eval.datasets import LAYOUTS
    from mmpretrain.eval.zeroshot import resolve_templates

    for i, spec in enumerate(cfg.zeroshot):
        head, sep, root = spec.partition("=")
        layout = head.rpartition("@")[2]
        if not sep or layout not in LAYOUTS:
            raise ConfigError(
                f"eval.zeroshot[{i}]: {spec!r} must be [NAME@]LAYOUT=DIR with LAYOUT one of "
                f"{', '.join(LAYOUTS.names())}"
            )
        if not Path(root).is_dir():
            raise ConfigError(f"eval.zeroshot[{i}]: folder not found: {root}")
    if cfg.zeroshot:
        try:
            resolve_templates(cfg.templates)
        except ValueError as exc:
            raise ConfigError(f"eval.templates: {exc}") from None
