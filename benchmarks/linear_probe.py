#!/usr/bin/env python
"""The linear and few-shot probes of docs/evaluation.md, measured and logged: `make demo`'s LiT model on
the emoji corpus, the concept task (240 classes: 1, 2, 4 shots) and the coarse group task (8 classes:
1 to 16 shots), each probe trained on the six training styles and tested on the held-out styles.

    python benchmarks/linear_probe.py [--model runs/demo/lit/checkpoints] [--log FILE]

Runs the two `mmpretrain eval linear-probe` commands the page shows (3 seeds each), times them, and logs
their tables (and writes their JSON reports and PNGs under runs/demo/). Run it with nothing else on
the machine; it needs `make demo` (its model and corpus).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from logs import ROOT, emit, header

EVAL = "data/emoji/eval"
TASKS = {
    "concepts": (
        ["--train", f"seen@folder={EVAL}/train_styles_seen", "--test", f"rendition@folder={EVAL}/rendition",
         f"sketch@folder={EVAL}/sketch", "--shots", "1", "2", "4"],
        "runs/demo/linear_probe",
    ),
    "groups": (
        ["--train", f"groups@folder={EVAL}/groups_train_styles_seen", "--test",
         f"rendition@folder={EVAL}/groups_rendition", f"sketch@folder={EVAL}/groups_sketch",
         "--shots", "1", "2", "4", "8", "16"],
        "runs/demo/linear_probe_groups",
    ),
}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/lit/checkpoints", help="the model (default: make demo's)")
    p.add_argument("--log", help="write the tables here (first line: the command and the commit)")
    args = p.parse_args()
    lines = [header()]
    for name, (task, out) in TASKS.items():
        cmd = [sys.executable, "-m", "mmpretrain.cli", "eval", "linear-probe", "--model", args.model, *task,
               "--seeds", "0", "1", "2", "--out", f"{out}.json", "--plot", f"{out}.png"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name}: failed:\n{proc.stderr[-3000:]}")
        seconds = time.perf_counter() - start
        lines += [f"== {name}: mmpretrain eval linear-probe {' '.join(cmd[6:])}", f"({seconds:.0f} s wall)"]
        lines += [line for line in proc.stdout.splitlines() if line.strip() and not line.startswith("report:")]
    emit(lines, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
