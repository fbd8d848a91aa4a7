"""Where checkpoints live and which one is valid: the read side of the checkpoint layout, used by
loading (``models.pretrained``), fine-tuning (``models.init``) and resuming (``training``). Writing
them is ``training.checkpoint``.

``<run>/checkpoints/step_XXXXXXXX/`` holds ``model.safetensors``, ``state.pt``, ``config.yaml`` and
``checksums.json`` (sha256 and size of the other three, written last).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from safetensors.torch import load_model
from torch import nn

from mmpretrain.utils.io import sha256_file

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT = "mmpretrain-checkpoint/1"
CHECKSUMS = "checksums.json"
FILES = ("model.safetensors", "state.pt", "config.yaml")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def step_of(ckpt: Path) -> int:
    return int(STEP_DIR.match(Path(ckpt).name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every ``step_*`` folder of a run, oldest first (valid or not: see ``verify_checkpoint``)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=step_of)


def verify_checkpoint(ckpt: Path, *, deep: bool = True) -> str | None:
    """None if ``ckpt`` is complete and matches its checksums, else what is wrong with it.
    ``deep=False`` checks presence and sizes only (no hashing).

    A checkpoint written before checksums existed (no ``checksums.json``) passes if its files exist."""
    ckpt = Path(ckpt)
    missing = [f for f in FILES if not (ckpt / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    if not (ckpt / CHECKSUMS).is_file():
        log.warning("%s has no %s (written by an older version): not verified", ckpt, CHECKSUMS)
        return None
    try:
        recorded = json.loads((ckpt / CHECKSUMS).read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable {CHECKSUMS}: {exc}"
    for name, want in recorded.items():
        path = ckpt / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {want['bytes']} recorded"
        if deep and sha256_file(path) != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def find_latest(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes ``verify_checkpoint``; newer broken ones
    are skipped with a warning naming them and why."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    return None


def load_weights(model: nn.Module, ckpt: Path, *, strict: bool = True) -> None:
    path = Path(ckpt) / "model.safetensors" if Path(ckpt).is_dir() else Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path}")
    missing, unexpected = load_model(model, str(path), strict=strict)
    if missing or unexpected:
        log.warning("weights %s: missing %s, unexpected %s", path, missing[:5], unexpected[:5])


def write_checksums(folder: Path, step: int) -> None:
    """``checksums.json`` for ``FILES`` in ``folder`` (sha256 and size of each, as read back)."""
    files = {f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size} for f in FILES}
    (folder / CHECKSUMS).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
