#!/usr/bin/env python
"""LoRA against a full fine-tune (issue 31; docs/training.md, "Fine-tuning"): `make demo`'s LiT model
(trained on emoji) adapted to the desktop-icon corpus, each variant the same number of steps from the
same checkpoint, in a process of its own (its peak RSS is that process's):

    full            the image tower and both heads train (the text tower stays locked, as in the demo),
                    lr 1e-4
    full + decay    the same with layer-wise LR decay 0.75 over the image tower's 14 layer groups
    LoRA r=16       peft adapters (rank 16) on the image tower's qkv, attention output and MLP projections;
                    the tower's weights and both heads stay as loaded, lr 1e-3

    python benchmarks/lora.py [--steps 300] [--model runs/demo/lit/checkpoints] [--corpus data/icons]
        [--log benchmarks/results/lora_DATE.log]

Per variant: trainable parameters, step time (median over the logged steps), peak RSS, and zero-shot
top-1 / text->image R@10 on the icon corpus's seen styles, held-out renditions, symbolic (sketch) and
unseen concepts; the starting model's row is zero-shot transfer from emoji. Runs are kept in
runs/bench_lora (delete it to retrain). Needs `make demo` and the icon corpus
(`mmpretrain data build icons --out data/icons`). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from logs import ROOT, emit, header
from objectives import SPLITS, evaluate, train

TEMPLATE = "a <> icon"
CONFIG = "emoji_hybrid_lit.yaml"  # the demo's model and recipe; data.train is replaced by the icon shards


def variants(model: str) -> dict[str, list[str]]:
    start = [f"model.pretrained={model}", "optim.warmup_steps=20"]
    return {
        "full": [*start, "optim.lr=1.0e-4"],
        "full + decay": [*start, "optim.lr=1.0e-4", "model.towers.image.layer_decay=0.75"],
        "LoRA r=16": [*start, "optim.lr=1.0e-3", "model.towers.image.lora={r: 16, alpha: 32}"],
    }


def trainable(run: Path) -> tuple[int, int]:
    from mmpretrain import api
    from mmpretrain.models import build_model
    from mmpretrain.models.lora import trainable_count

    return trainable_count(build_model(api.load_config(run / "resolved.yaml").model))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--model", default="runs/demo/lit/checkpoints", help="the model to adapt (make demo's)")
    p.add_argument("--corpus", default="data/icons", help="the icon corpus (shards/ and eval/)")
    p.add_argument("--out", default="runs/bench_lora")
    p.add_argument("--log", help="write the table here (first line: the command and the commit)")
    args = p.parse_args()
    corpus, out = ROOT / args.corpus, ROOT / args.out
    rows = {"start (emoji)": {"run": ROOT / args.model, "eval": evaluate(ROOT / args.model, corpus, TEMPLATE)}}
    for name, extra in variants(str(ROOT / args.model)).items():
        r = train(name, CONFIG, extra, args.steps, out, corpus)
        rows[name] = {**r, "params": trainable(r["run"]), "eval": evaluate(r["run"], corpus, TEMPLATE)}
    head = f"{'variant':<14} {'trainable':>12} {'of':>11} {'s/step':>7} {'peak RSS':>9}"
    head += "".join(f" {s + ' top-1':>15} {s[:6] + ' R@10':>12}" for s in SPLITS)
    lines = [header(), f"{args.steps} steps x batch 64 per variant, 2 cores; zero-shot template '{TEMPLATE}'", head]
    for name, r in rows.items():
        cost = (
            f"{r['params'][0]:12,d} {r['params'][1]:11,d} {r['step_s']:7.3f} {r['peak_rss_mb'] / 1024:7.2f}GB"
            if "params" in r
            else f"{'-':>12} {'-':>11} {'-':>7} {'-':>9}"
        )
        scores = "".join(f" {100 * r['eval'][s]['top1']:15.1f} {100 * r['eval'][s]['r10']:12.1f}" for s in SPLITS)
        lines.append(f"{name:<14} {cost}{scores}")
    emit(lines, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
