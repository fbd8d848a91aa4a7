"""The first line of every benchmark log: the command as run, the date, the cores and the commit
(docs and README quote figures by their log in benchmarks/results/)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# what a figure does not depend on: a docs edit while a benchmark runs does not make its commit "dirty"
NOT_CODE = (":!docs", ":!*.md", ":!benchmarks/results")


def commit() -> str:
    """HEAD's short hash, with ``+dirty`` when tracked files other than docs and results differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", *NOT_CODE], cwd=ROOT).returncode != 0
    return head.stdout.strip() + ("+dirty" if dirty else "")


def header() -> str:
    """``# python benchmarks/X.py ARGS   (DATE, N CPU cores, commit C)`` for the running script."""
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return f"# python {name} {' '.join(sys.argv[1:])}   ({date.today()}, {os.cpu_count()} CPU cores, commit {commit()})"


def emit(lines: list[str], log: str | None) -> None:
    """Print a benchmark's lines and, with ``log``, write them there (the first line: ``header()``)."""
    print("\n".join(lines))
    if log:
        Path(log).write_text("\n".join(lines) + "\n")
