"""Metrics sinks: JSONL (one object per log step) and TensorBoard, on the main rank only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mmpretrain.utils.io import atomic_write_text


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            truncate_jsonl(self.path, resume_step)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records with ``"step" > step`` (written after the checkpoint a run resumes from), and a
    line torn by a kill mid-write; the file is replaced atomically."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    kept = [line for line in lines if (_record(line) or {}).get("step", step + 1) <= step]
    if len(kept) != len(lines) or (text and not text.endswith("\n")):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _record(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [r for r in map(_record, path.read_text(encoding="utf-8", errors="replace").splitlines()) if r is not None]
