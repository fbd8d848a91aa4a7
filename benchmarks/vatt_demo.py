#!/usr/bin/env python
"""`make vatt-demo`, measured and logged (docs/video_audio.md, "Measured"): VATT on the motion corpus.

    python benchmarks/vatt_demo.py [--out runs/bench_vatt] [--log FILE]

Builds the motion corpus if it is missing (`mmpretrain data build motion`, timed), trains
configs/experiment/motion_vat.yaml (600 steps of 32 clips; a finished run in --out is reused), then
runs `mmpretrain eval media` with 2 clips x 3 crops on the corpus's three evaluation splits, as the
Makefile's vatt-demo does. Prints and logs: the build and training wall time, the median clips/s,
each pair's loss at its first and last logged step, and per split every zero-shot and retrieval
figure beside its chance level. Run it with nothing else on the machine.

With --inflated, also the image-to-video transfer of docs/video_audio.md: the emoji small ViT
(configs/experiment/emoji_small_vit_lit.yaml, on the emoji corpus of `make demo`) inflated into a wider
video tower (motion_vat_inflated.yaml) against the same architecture from scratch, 600 steps each,
evaluated the same way, side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from logs import ROOT, emit, header

SPLITS = {"heldout": "heldout_combos", "seen": "seen", "unseen": "unseen_concepts"}  # as the Makefile names them
CLI = [sys.executable, "-m", "mmpretrain.cli"]


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[2:5])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def losses(run_dir: Path) -> tuple[list[str], float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = rows[0], rows[-1]
    keys = sorted(k for k in last if k.startswith("loss/"))
    lines = [f"{k[5:]:<14} step {first['step']:>3} {first[k]:.2f} -> step {last['step']} {last[k]:.2f}" for k in keys]
    return lines, statistics.median(r["samples_per_s"] for r in rows if "samples_per_s" in r)


def eval_lines(report: dict) -> list[str]:
    out = []
    for r in report["media"]:
        out.append(f"{r['dataset']}: {r['samples']} samples, views {r['views']}")
        for z in r["zeroshot"]:
            label = f"{z['modality']} -> {z['label']} ({z['classes']})"
            out.append(f"  zero-shot {label:<26} top-1 {100 * z['top1']:5.1f}%   chance {100 * z['chance_top1']:4.1f}%")
        for t in r["retrieval"]:
            out.append(
                f"  retrieval {t['task']:<26} R@1 {100 * t['R@1']:5.1f}% (chance {100 * t['R@1_chance']:4.1f}%)"
                f"   R@10 {100 * t['R@10']:5.1f}% (chance {100 * t['R@10_chance']:4.1f}%)   {t['queries']} queries"
            )
    return out


def train(config: str, run_dir: Path, corpus: Path, *extra: str) -> float:
    return run([*CLI, "train", f"configs/experiment/{config}", f"train.run_dir={run_dir}", "train.resume=latest",
                f"data.train={corpus}/shards", "train.progress=false", *extra])  # fmt: skip


def evaluate(run_dir: Path, corpus: Path) -> tuple[float, dict]:
    report = run_dir / "eval_media.json"
    specs = [f"{name}@shards:concept,motion={corpus}/eval/{split}" for name, split in SPLITS.items()]
    seconds = run([*CLI, "eval", "media", "--model", str(run_dir / "checkpoints"), "--modalities", "video", "audio",
                   "--clips", "2", "--crops", "3", "--data", *specs, "--out", str(report)])  # fmt: skip
    return seconds, json.loads(report.read_text())


def inflated(out: Path, corpus: Path, emoji: Path) -> list[str]:
    """The wide video tower from the emoji ViT and from scratch: first video-text loss, then every figure."""
    train("emoji_small_vit_lit.yaml", out / "emoji_small_vit_lit", emoji)
    runs = {"inflated": ["model.towers.video.init_from=" + str(out / "emoji_small_vit_lit" / "checkpoints")],
            "scratch": ["model.towers.video.init_from=null"]}  # fmt: skip
    lines = ["== image pre-training carried over (motion_vat_inflated.yaml; from scratch: init_from=null)"]
    for name, extra in runs.items():
        seconds = train("motion_vat_inflated.yaml", out / f"motion_vat_{name}", corpus, *extra)
        loss_lines, rate = losses(out / f"motion_vat_{name}")
        lines += [f"-- {name}: training {seconds:.0f} s wall, median {rate:.1f} clips/s", *loss_lines]
        lines += eval_lines(evaluate(out / f"motion_vat_{name}", corpus)[1])
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_vatt", help="the run folders (a finished run is reused)")
    p.add_argument("--corpus", default="data/motion", help="the motion corpus (built here if missing)")
    p.add_argument("--emoji", default="data/emoji", help="the emoji corpus, for --inflated (make demo builds it)")
    p.add_argument("--inflated", action="store_true", help="also the image-ViT-inflated tower against scratch")
    p.add_argument("--log", help="write the figures here (first line: the command and the commit)")
    args = p.parse_args()
    corpus, out = ROOT / args.corpus, (ROOT / args.out).resolve()
    lines = [header()]
    if not (corpus / "manifest.json").is_file():
        seconds = run([*CLI, "data", "build", "motion", "--out", str(corpus)])
        size = sum(f.stat().st_size for f in corpus.rglob("*") if f.is_file()) / 1e6
        lines.append(f"corpus built in {seconds:.0f} s ({size:.0f} MB)")
    train_s = train("motion_vat.yaml", out / "motion_vat", corpus)
    loss_lines, rate = losses(out / "motion_vat")
    lines += [f"training: {train_s:.0f} s wall (a reused run: the time to find it), median {rate:.1f} clips/s"]
    eval_s, report = evaluate(out / "motion_vat", corpus)
    lines += [*loss_lines, f"evaluation: {eval_s:.0f} s (2 clips x 3 crops per video)", *eval_lines(report)]
    if args.inflated:
        lines += inflated(out, corpus, ROOT / args.emoji)
    emit(lines, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
