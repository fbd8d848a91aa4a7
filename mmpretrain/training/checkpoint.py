"""Checkpoints: ``<run>/checkpoints/step_XXXXXXXX/`` holding

    model.safetensors   weights (safetensors, loadable without pickle)
    state.pt            optimizer, scheduler, step, RNG states, data-stream positions of
                        every rank/worker (``torch.load(weights_only=True)``-safe)
    config.yaml         the resolved experiment config (so the checkpoint stands alone)

Each checkpoint directory is written under a temp name and renamed into place, so a
killed run never leaves a half-written checkpoint that ``resume=latest`` could pick.
"""
from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from mmpretrain.utils.io import atomic_dir

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT = "mmpretrain-checkpoint/1"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_latest(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict[str, Any], config_yaml: str,
                    *, keep_last: int) -> Path:
    """Write one checkpoint atomically, then prune to the ``keep_last`` newest."""
    final = checkpoint_dir(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": FORMAT, "step": str(step)})
        torch.save({"format": FORMAT, "step": step, **state}, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def load_weights(model: nn.Module, ckpt: Path, *, strict: bool = True) -> None:
    path = Path(ckpt) / "model.safetensors" if Path(ckpt).is_dir() else Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path}")
    missing, unexpected = load_model(model, str(path), strict=strict)
    if missing or unexpected:
        log.warning("weights %s: missing %s, unexpected %s", path, missing[:5], unexpected[:5])


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
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
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
