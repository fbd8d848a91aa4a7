"""Checks of the evaluation settings (``eval.*``), run before training starts (``training.validate``):
an evaluation set that cannot be read fails at load, not at the first evaluation hours into a run."""

from __future__ import annotations

from mmpretrain.config.schema import EvalConfig
from mmpretrain.config.strict import ConfigError
from mmpretrain.eval.datasets import LAYOUTS
from mmpretrain.eval.sets import SET_KINDS, parse_set
from mmpretrain.eval.zeroshot import resolve_templates


def check_eval(cfg: EvalConfig) -> None:
    """``eval.zeroshot`` sets parse (``sets.parse_set``: any registered set kind, or a folder layout)
    and their data exists; ``eval.templates`` resolve."""
    for i, spec in enumerate(cfg.zeroshot):
        try:
            parse_set(spec, check=True)
        except FileNotFoundError as exc:
            raise ConfigError(f"eval.zeroshot[{i}]: folder not found ({exc})") from None
        except ValueError as exc:
            raise ConfigError(
                f"eval.zeroshot[{i}]: {exc}; KIND is a set kind ({', '.join(SET_KINDS.names())}) "
                f"or a LAYOUT one of {', '.join(LAYOUTS.names())}"
            ) from None
    if cfg.zeroshot:
        try:
            resolve_templates(cfg.templates)
        except ValueError as exc:
            raise ConfigError(f"eval.templates: {exc}") from None
