#!/usr/bin/env python
"""Summarise a run: print the first/last logged losses and throughput, and plot the curves.

python scripts/summarize_run.py runs/smoke     # writes runs/smoke/loss.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description="Summarise a training run's metrics.jsonl and plot its loss.")
    p.add_argument("run_dir", type=Path)
    args = p.parse_args()
    path = args.run_dir / "metrics.jsonl"
    if not path.exists():
        print(f"no metrics at {path}", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        print(f"{path} is empty", file=sys.stderr)
        return 2
    first, last = rows[0], rows[-1]
    sps = sorted(r["samples_per_s"] for r in rows)[len(rows) // 2]
    print(f"run            {args.run_dir}")
    print(f"steps          {last['step']}")
    print(f"loss           {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})")
    print(f"logit scale    {last['logit_scale']:.2f}")
    print(f"samples/s      {sps:.1f} (median of logged windows)")
    skipped = {k: v for k, v in last.items() if k.startswith("data/skipped_")}
    print(f"data skipped   {skipped or 'none'}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    resolved = args.run_dir / "resolved.yaml"
    if resolved.exists():  # a CLIP loss at chance is ln(global batch); mark it
        import math

        import yaml

        cfg = yaml.safe_load(resolved.read_text())
        batch = cfg["data"]["batch_size"] * cfg["train"]["accum_steps"]
        ax.axhline(math.log(batch), color="gray", ls="--", lw=1, label=f"chance, ln({batch})")
        print(f"chance loss    {math.log(batch):.3f} (ln of the per-rank batch)")
    ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title(f"{args.run_dir.name}: loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = args.run_dir / "loss.png"
    fig.savefig(out, dpi=120)
    print(f"plot           {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
