"""Named crash points for the fault suite (``benchmarks/faults.py``), in the way SQLite's crash
tests and FoundationDB's simulation inject failures at chosen places of real code.

``MMPRETRAIN_CRASH_AT="name"`` (or ``"name:n"``) kills this process with SIGKILL the n-th time
(default: the first) it passes ``crash_point("name")``. Unset, a crash point is one dict lookup.
Points: ``ckpt.weights``, ``ckpt.state``, ``ckpt.checksums`` (inside a checkpoint's temp folder),
``atomic_dir.synced`` (before the rename), ``ckpt.renamed`` (after it, before pruning),
``remove_tree.renamed`` (pruning, between rename and delete), ``train.step`` (after a step).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("MMPRETRAIN_CRASH_AT", "")
_NAME, _, _NTH = _SPEC.partition(":")
_seen = {"count": 0}


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``MMPRETRAIN_CRASH_AT`` names this point (and this is its n-th pass)."""
    if not _NAME or name != _NAME:
        return
    _seen["count"] += 1
    if _seen["count"] >= int(_NTH or 1):
        os.kill(os.getpid(), signal.SIGKILL)
