"""Which checkpoint a run starts from, and whether the config it resumes with keeps the promise
that a resumed run continues exactly as the uninterrupted one would have.

Run-folder identity: a fresh start in a folder that already holds checkpoints is refused (it would
mix two runs' checkpoints and logs); ``train.resume=latest`` continues it, ``train.overwrite=true``
starts over. Resume compatibility: the checkpoint's stored config is compared with the new one,
field by field. Changes that leave the continuation well defined (run length, learning rate,
logging, evaluation, precision) are accepted and logged; changes that break exactness (batch size,
seed, data, ops, model, loss, world size, ...) are refused with the list of fields, unless named in
``train.resume_allow``. When an allowed change makes the saved data positions meaningless (other
shards, seed, workers or ranks), every stream restarts at the start of the next epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmpretrain.config.schema import ExperimentConfig, TrainConfig
from mmpretrain.config.strict import ConfigError, to_dict
from mmpretrain.errors import CheckpointError
from mmpretrain.models.layout import find_latest, list_checkpoints, step_of, verify_checkpoint
from mmpretrain.models.pretrained import native_format, resolve_checkpoint
from mmpretrain.training.checkpoint import clean_stale
from mmpretrain.utils.io import remove_tree

log = logging.getLogger(__name__)
WORLD_SIZE = "world_size"  # not a config field: the number of ranks, stored with the checkpoint

# Accepted on resume (logged): they change what happens next, not what the saved state means.
ACCEPTED = (
    "train.steps",
    "train.stop_after",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.resume",
    "train.progress",
    "train.threads",
    "train.log_sample_keys",
    "train.compile",
    "train.strategy",  # either strategy reads either checkpoint format
    "train.fsdp",
    "train.grad_checkpointing",
    "train.precision",
    "train.device",
    "train.dist_backend",
    "train.overwrite",
    "train.resume_allow",
    "train.name",
    "train.run_dir",
    "optim",
    "eval",
    "data.on_error",
    "data.max_errors",
    "data.prefetch_factor",
    "data.timeout_s",
    "data.stall_timeout_s",
    "data.max_member_bytes",
    "data.eval_ops",
)
# Allowed only through train.resume_allow; these also restart the data streams at the next epoch.
RESTARTS_DATA = (
    "data.train",
    "data.sources",
    "data.num_workers",
    "data.shuffle_buffer",
    "data.shuffle_shards",
    "data.resampled",
    "train.seed",
    WORLD_SIZE,
)


@dataclass(frozen=True)
class ResumePlan:
    """How a resumed run continues: ``accepted`` / ``allowed`` changed fields, and whether the data
    streams and RNGs restart (at ``restart_epoch``) instead of continuing from the saved positions."""

    accepted: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    restart_data: bool = False


def _matches(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are leaves (compared whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (keys absent from ``old``, i.e. newer defaults, count as equal;
    a whole tower added or removed counts once)."""
    a, b = flatten(old), flatten(new)
    changed = {k for k in a.keys() & b.keys() if a[k] != b[k]}
    changed |= {k for k in a.keys() - b.keys()}  # a field of the checkpoint's config the new one lacks
    towers = {".".join(k.split(".")[:3]) for k in (a.keys() ^ b.keys()) if k.startswith("model.towers.")}
    return sorted(changed | towers)


def plan_resume(cfg: ExperimentConfig, ckpt: Path, saved_world_size: int, world_size: int) -> ResumePlan:
    """Compare the checkpoint's config (and world size) with this run's; raise ``ConfigError`` listing
    every change that breaks exact resume and is not in ``train.resume_allow``."""
    try:
        old = yaml.safe_load((Path(ckpt) / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{ckpt}: cannot read its config.yaml: {exc}") from None
    changed = config_changes(old, to_dict(cfg))
    if saved_world_size != world_size:
        changed.append(WORLD_SIZE)
    allow = tuple(cfg.train.resume_allow)
    accepted = tuple(k for k in changed if _matches(k, ACCEPTED))
    rest = [k for k in changed if k not in accepted]
    refused = [k for k in rest if not _matches(k, allow)]
    if refused:
        old_flat, new_flat = flatten(old), flatten(to_dict(cfg))
        detail = "; ".join(_describe(k, old_flat, new_flat, saved_world_size, world_size) for k in refused)
        raise ConfigError(
            f"cannot resume {ckpt} exactly: {detail}. Undo the change(s), start a new run (another train.name, or "
            f"train.overwrite=true), or accept an inexact continuation with "
            f"train.resume_allow=[{','.join(refused)}]"
        )
    for key in accepted:
        log.info("resume: %s changed since the checkpoint (accepted)", key)
    allowed = tuple(rest)
    restart = any(_matches(k, RESTARTS_DATA) for k in allowed)
    for key in allowed:
        log.warning(
            "resume: %s changed since the checkpoint (train.resume_allow): the continuation is not exact%s",
            key,
            "; data streams restart at the next epoch" if restart else "",
        )
    return ResumePlan(accepted, allowed, restart)


def _describe(key: str, old: dict, new: dict, saved_ws: int, ws: int) -> str:
    if key == WORLD_SIZE:
        return f"world size {saved_ws} -> {ws}"
    show = lambda v: repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."  # noqa: E731
    return f"{key} {show(old.get(key, '(absent)'))} -> {show(new.get(key, '(absent)'))}"


@dataclass(frozen=True)
class StartDecision:
    """Where a run starts (``ckpt``; None: fresh) and what ``train.overwrite`` deletes first:
    the earlier run (``start_over``) or the newer checkpoints a branch leaves behind (``drop``)."""

    ckpt: str | None = None
    start_over: bool = False
    drop: tuple[str, ...] = ()


def choose_checkpoint(tc: TrainConfig, run_dir: Path) -> StartDecision:
    """On the main rank, before any rank builds anything: decide where this run starts. Refuses to
    start fresh over an earlier run's checkpoints, or to resume an older checkpoint of this run
    while newer valid ones exist, unless ``train.overwrite``. Deletes nothing (``apply_decision``
    does, once the resume is known to be acceptable)."""
    run_dir = Path(run_dir)
    existing = list_checkpoints(run_dir)
    ckpt = _resume_target(tc, run_dir)
    if ckpt is None and existing:
        if not tc.overwrite:
            if find_latest(run_dir) is None:
                raise ConfigError(
                    f"{run_dir} holds checkpoints, but none of them passes its checksums (newest: "
                    f"{existing[-1].name}; the log says why each was skipped). Restore one from a copy, start over "
                    "with train.overwrite=true (deletes them and the logs), or choose another train.name"
                )
            raise ConfigError(
                f"{run_dir} already holds checkpoints of an earlier run (newest: {existing[-1].name}). "
                f"Continue it with train.resume=latest, start over with train.overwrite=true (deletes its "
                f"checkpoints and logs), or choose another train.name"
            )
        return StartDecision(None, start_over=True)
    newer: list[Path] = []
    if ckpt is not None and _inside(ckpt, run_dir):  # broken newer ones are not a branch: they get rewritten
        newer = [c for c in existing if step_of(c) > step_of(ckpt) and verify_checkpoint(c) is None]
        if newer and not tc.overwrite:
            raise ConfigError(
                f"resuming {ckpt.name} would branch off {run_dir}, which has newer checkpoints "
                f"({', '.join(c.name for c in newer)}); resume=latest continues from the newest, or set "
                f"train.overwrite=true to delete the newer ones and continue from {ckpt.name}"
            )
    return StartDecision(str(ckpt) if ckpt is not None else None, drop=tuple(map(str, newer)))


def apply_decision(decision: StartDecision, run_dir: Path) -> None:
    """Main rank: tidy the run folder (leftovers of interrupted writes) and carry out what the
    decision deletes."""
    clean_stale(run_dir)
    if decision.start_over:
        start_over(run_dir)
    for path in decision.drop:
        log.warning("train.overwrite: deleting %s (newer than the checkpoint this run branches from)", path)
        remove_tree(path)


def _resume_target(tc: TrainConfig, run_dir: Path) -> Path | None:
    if tc.resume is None:
        return None
    if tc.resume == "latest":
        found = find_latest(run_dir)
        log.info("resume=latest: %s", found or "no checkpoint yet, starting fresh")
        return found

    try:
        path = resolve_checkpoint(tc.resume, formats={native_format()}).path
    except FileNotFoundError:
        raise FileNotFoundError(f"train.resume={tc.resume!r}: not a checkpoint directory (no state.pt)") from None
    except ConfigError as exc:
        raise ConfigError(f"train.resume={tc.resume!r}: {exc}") from None
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"train.resume={tc.resume!r}: not a checkpoint directory (no state.pt)")
    return path


def start_over(run_dir: Path) -> None:
    """``train.overwrite``: delete an earlier run's checkpoints and logs (each deletion crash-safe)."""
    log.warning("train.overwrite: deleting the earlier run's checkpoints and logs in %s", run_dir)
    for ckpt in list_checkpoints(run_dir):
        remove_tree(ckpt)
    for path in [run_dir / "metrics.jsonl", *run_dir.glob("samples.rank*.jsonl")]:
        path.unlink(missing_ok=True)
    remove_tree(run_dir / "tb")


def _inside(path: Path, run_dir: Path) -> bool:
    try:
        return Path(path).resolve().parent == (Path(run_dir) / "checkpoints").resolve()
    except OSError:
        return False
