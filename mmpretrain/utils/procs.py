"""Process trees from /proc (Linux): killing a ``pipe:`` command with everything it started, and
finding torchrun's rank processes (for fault tests). Elsewhere they see no children."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def children() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process this user can see."""
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(stat.parent.name))
    return out


def kill_tree(pid: int, *, keep_root: bool = False) -> None:
    """SIGKILL ``pid`` and all its descendants; ``keep_root``: only the descendants."""
    tree, todo, doomed = children(), [pid], []
    while todo:
        p = todo.pop()
        doomed.append(p)
        todo.extend(tree.get(p, []))
    for p in doomed[1:] if keep_root else doomed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def rank_pids(agent: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes that torchrun's agent ``agent`` started."""
    found = {}
    for pid in children().get(agent, []):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = pid
    return found
