"""Checkpoints: ``<run>/checkpoints/step_XXXXXXXX/`` holding

    model.safetensors   weights (safetensors, loadable without pickle); with train.strategy=fsdp
      or sharded/       a torch.distributed.checkpoint folder of the model's and the optimizer's
                        shards, written by every rank (see ``models.layout``, ``training.strategy``)
    state.pt            optimizer (DDP), scheduler, step, RNG states, data-stream positions of
                        every rank/worker (``torch.load(weights_only=True)``-safe)
    config.yaml         the resolved experiment config (so the checkpoint stands alone)
    checksums.json      sha256 and size of every file above (written last)

Each checkpoint is written into a temp folder, every file fsynced, then renamed into place and
verified, so a killed run or a power cut never leaves a half-written checkpoint under a
``step_*`` name. ``find_latest`` returns the newest checkpoint that passes its checksums and says
which newer ones it skipped; pruning keeps the one just written (verified) and never deletes
before that write has succeeded.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model
from torch import nn

from mmpretrain.errors import CheckpointError
from mmpretrain.models.layout import (
    FORMAT,
    checkpoint_dir,
    list_checkpoints,
    step_of,
    verify_checkpoint,
    write_checksums,
)
from mmpretrain.training.dist import DistInfo, barrier, broadcast_object
from mmpretrain.utils.faults import crash_point
from mmpretrain.utils.io import atomic_dir, remove_tree

log = logging.getLogger(__name__)
STALE = re.compile(r"^\.step_\d{8}\..+")  # temp, moved-aside and being-deleted checkpoint folders


def save_checkpoint(
    run_dir: Path,
    step: int,
    write_weights: Callable[[Path | None], dict[str, Any]],
    state: dict[str, Any] | None,
    config_yaml: str,
    *,
    keep_last: int,
    info: DistInfo = DistInfo(),
) -> Path:
    """Write one checkpoint atomically and durably, verify it, then prune older ones. Called on every
    rank: the main rank owns the temp folder, ``state`` and the rename; ``write_weights(folder)`` runs
    on every rank (``folder`` is None on the others) and returns what ``state.pt`` adds, so a sharded
    strategy's ranks can all write into the one temp folder.

    The checksums are computed by reading the written files back. A valid checkpoint already at
    ``step`` (a resumed run stopped before its first step) is kept as it is; a broken one is replaced
    only once the new one is complete."""
    final = checkpoint_dir(run_dir, step)
    if broadcast_object(info.is_main and final.exists() and verify_checkpoint(final) is None, info):
        log.info("checkpoint %s already saved", final)
        return final
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(final)) if info.is_main else None
        extra = write_weights(tmp)
        crash_point("ckpt.weights")
        barrier(info)  # every rank's shards are on disk before the main rank seals the folder
        if tmp is not None:
            torch.save({"format": FORMAT, "step": step, **state, **extra}, tmp / "state.pt")
            crash_point("ckpt.state")
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            write_checksums(tmp, step)
            crash_point("ckpt.checksums")
    if info.is_main:
        crash_point("ckpt.renamed")
        problem = verify_checkpoint(final, deep=False)  # the hashes were computed from the files as read back
        if problem is not None:
            raise CheckpointError(f"checkpoint {final} failed verification right after it was written: {problem}")
        prune_checkpoints(run_dir, final, keep_last)
        log.info("saved checkpoint %s", final)
    barrier(info)
    return final


def weights_only(model: nn.Module) -> Callable[[Path | None], dict[str, Any]]:
    """A ``write_weights`` for one process: the model as ``model.safetensors``, nothing added to the state."""

    def write(folder: Path | None) -> dict[str, Any]:
        if folder is not None:
            save_model(model, str(folder / "model.safetensors"), metadata={"format": FORMAT})
        return {}

    return write


def prune_checkpoints(run_dir: Path, newest: Path, keep_last: int) -> None:
    """Keep ``newest`` and the ``keep_last - 1`` checkpoints before it; delete older ones.
    Checkpoints after ``newest`` are never touched."""
    older = [c for c in list_checkpoints(run_dir) if step_of(c) < step_of(newest)]
    for old in older[: max(0, len(older) - (max(1, keep_last) - 1))]:
        remove_tree(old)


def clean_stale(run_dir: Path) -> list[str]:
    """Remove what killed runs left in ``checkpoints/`` (temp, moved-aside, half-deleted folders)."""
    root = Path(run_dir) / "checkpoints"
    removed = [p.name for p in root.iterdir() if p.is_dir() and STALE.match(p.name)] if root.is_dir() else []
    for name in removed:
        shutil.rmtree(root / name, ignore_errors=True)
    if removed:
        log.info("removed %d leftover folder(s) of interrupted checkpoint writes in %s", len(removed), root)
    return removed


def load_state(ckpt: Path) -> dict[str, Any]:
    state = torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{ckpt}: not an {FORMAT} checkpoint (format={state.get('format')!r})")
    return state


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and CUDA, in weights_only-loadable types."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
