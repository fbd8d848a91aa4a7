#!/usr/bin/env python
"""What each training objective does on the emoji corpus (issue 29; docs/training.md, "Objectives").

    python benchmarks/objectives.py [--steps 480] [--teacher runs/demo/lit] [--log FILE]

Trains the demo's LiT configuration (configs/experiment/emoji_hybrid_lit.yaml: the ResNet-ViT hybrid at
64 px, locked MiniLM text tower, batch 64) for the same number of steps per variant, each in a process
of its own (its peak RSS is that process's), then evaluates every model on the corpus's four splits:

    baseline        emoji_hybrid_lit.yaml
    multi-positive  emoji_multipos.yaml: the images and captions of one concept are positives of each other
    self-distill    emoji_silc.yaml: + SILC's EMA-teacher self-distillation over 2 global and 2 local crops,
                    for the last 20% of the steps
    + masked pred.  emoji_silc_tips.yaml: self-distillation and TIPS's masked prediction (half the patches),
                    both for the last 20%
    captioning      emoji_locca.yaml: + a LocCa captioning decoder (2 layers, its own embeddings over MiniLM's
                    vocabulary) and the caption objective, from the start
    all (no dec.)   emoji_all.yaml without its decoder: multi-positive + self-distillation + masked prediction
    all             emoji_all.yaml: multi-positive + captioning + self-distillation + masked prediction
    student         emoji_distill.yaml without its objective: the hybrid with 4 of its 12 layers
    student+distill emoji_distill.yaml: the same student with open_clip's DistillClipLoss term against
                    the frozen teacher (--teacher; `make demo` writes runs/demo/lit)

Per variant: zero-shot top-1 on seen / rendition / sketch / unseen, text->image R@10 on the same
splits, for a variant with a decoder the CIDEr of its greedy captions (the references: the corpus's
caption templates filled with the image's concept), the training step time (median over the run's
logged steps) and peak RSS. Runs reuse finished checkpoints in
runs/bench_objectives (delete it to retrain). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from logs import ROOT, header

from mmpretrain.corpora.emoji import TEMPLATES as EMOJI_TEMPLATES

SPLITS = {"seen": "train_styles_seen", "rendition": "rendition", "sketch": "sketch", "unseen": "unseen_concepts"}
TEMPLATE = "a <> emoji"
CAPTION_TEMPLATES = tuple(t.replace("{label}", "<>") for t in EMOJI_TEMPLATES if "{tag}" not in t)
NO_DECODER = ["model.decoder=null", "loss.objectives=[{kind: self_distill, start_frac: 0.8}, "
              "{kind: masked_prediction, start_frac: 0.8}]"]  # fmt: skip


def variants(teacher: str) -> dict[str, tuple[str, list[str]]]:
    return {
        "baseline": ("emoji_hybrid_lit.yaml", []),
        "multi-positive": ("emoji_multipos.yaml", []),
        "self-distill (last 20%)": ("emoji_silc.yaml", []),
        "+ masked pred. (last 20%)": ("emoji_silc_tips.yaml", []),
        "captioning decoder": ("emoji_locca.yaml", []),
        "all (no decoder)": ("emoji_all.yaml", NO_DECODER),
        "all": ("emoji_all.yaml", []),
        "student (4 layers)": ("emoji_distill.yaml", ["loss.objectives=[]"]),
        "student + distill": (
            "emoji_distill.yaml",
            [f"loss.objectives=[{{kind: distill, weight: 1.0, params: {{teacher: {teacher}}}}}]"],
        ),
    }


TRAIN = """
import json, resource, sys
from mmpretrain import api
api.train(sys.argv[1], json.loads(sys.argv[2]))
print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def train(name: str, config: str, extra: list[str], steps: int, out: Path, corpus: Path) -> dict:
    """Train one variant in a process of its own (or reuse its finished run); its step time and peak RSS."""
    run = out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
    overrides = [
        f"train.run_dir={run}",
        f"train.steps={steps}",
        "train.resume=latest",
        f"data.train={corpus}/shards",
        "train.progress=false",
        *extra,
    ]
    done = run / "checkpoints" / f"step_{steps:08d}"
    peak = json.loads((run / "peak.json").read_text())["peak_rss_mb"] if (run / "peak.json").is_file() else None
    if not done.is_dir() or peak is None:
        cfg = str(ROOT / "configs" / "experiment" / config)
        proc = subprocess.run([sys.executable, "-c", TRAIN, cfg, json.dumps(overrides)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name}: training failed:\n{proc.stderr[-3000:]}")
        peak = float(proc.stdout.split("PEAK_RSS_MB")[-1])
        (run / "peak.json").write_text(json.dumps({"peak_rss_mb": peak}))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    batch = 64
    return {"run": run, "step_s": batch / statistics.median(rates), "peak_rss_mb": peak}


def evaluate(run: Path, corpus: Path, template: str = TEMPLATE) -> dict:
    from mmpretrain import api
    from mmpretrain.eval.captioning import captioning_eval
    from mmpretrain.eval.runner import EvalSet, embed_folder, folder_retrieval_metrics, zeroshot_metrics

    model = api.load_checkpoint(run).eval()  # a run folder, or a checkpoint
    out = {}
    for short, split in SPLITS.items():
        folder = EvalSet.parse(f"{split}@folder={corpus / 'eval' / split}")
        fe = embed_folder(model, folder, templates=template, progress=False)
        z, r = zeroshot_metrics(fe), folder_retrieval_metrics(fe, ks=(10,))
        out[short] = {"top1": z["top1"], "chance": z["chance_top1"], "r10": r["text_to_image_R@10"]}
        if model.decoder is not None:
            c = captioning_eval(model, folder, templates=CAPTION_TEMPLATES, max_len=16, progress=False)
            out[short] |= {"cider": c["cider"], "bleu4": c["bleu4"], "example": c["examples"][0]["caption"]}
    return out


def table(results: dict) -> list[str]:
    cols = " ".join(f"{s:>9}" for s in SPLITS)
    lines = [f"{'variant':<26} top-1 % {cols} | t2i R@10 % {cols} | CIDEr  {cols} | step s  peak RSS GB"]
    for name, r in results.items():
        top1 = " ".join(f"{100 * r['eval'][s]['top1']:9.1f}" for s in SPLITS)
        r10 = " ".join(f"{100 * r['eval'][s]['r10']:9.1f}" for s in SPLITS)
        cider = " ".join(f"{r['eval'][s]['cider']:9.3f}" if "cider" in r["eval"][s] else f"{'-':>9}" for s in SPLITS)
        cost = f"{r['step_s']:6.3f}  {r['peak_rss_mb'] / 1024:6.2f}"
        lines.append(f"{name:<26}         {top1} |            {r10} |        {cider} | {cost}")
    chance = " ".join(f"{100 * next(iter(results.values()))['eval'][s]['chance']:9.1f}" for s in SPLITS)
    lines.append(f"{'(chance)':<26}         {chance} |")
    for name, r in results.items():
        if "cider" in r["eval"]["seen"]:
            bleu = ", ".join(f"{s} {r['eval'][s]['bleu4']:.3f}" for s in SPLITS)
            lines.append(
                f"{name}: BLEU-4 {bleu}; a {SPLITS['rendition']} caption: {r['eval']['rendition']['example']!r}"
            )
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), gridspec_kw={"width_ratios": [3, 3, 2]})
    width = 0.8 / len(results)
    for ax, key, title in ((axes[0], "top1", "zero-shot top-1 (%)"), (axes[1], "r10", "text -> image R@10 (%)")):
        for i, (name, r) in enumerate(results.items()):
            xs = [j + i * width for j in range(len(SPLITS))]
            ax.bar(xs, [100 * r["eval"][s][key] for s in SPLITS], width, label=name, color=f"C{i}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SPLITS))], list(SPLITS))
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    captioners = [(i, name, r) for i, (name, r) in enumerate(results.items()) if "cider" in r["eval"]["seen"]]
    w = 0.8 / max(len(captioners), 1)
    for k, (i, name, r) in enumerate(captioners):
        xs = [j + k * w for j in range(len(SPLITS))]
        axes[2].bar(xs, [r["eval"][s]["cider"] for s in SPLITS], w, label=name, color=f"C{i}")
    axes[2].set_xticks([j + 0.4 - w / 2 for j in range(len(SPLITS))], list(SPLITS))
    axes[2].set_title("captioning CIDEr (greedy)")
    fig.suptitle("objectives on the emoji corpus (same steps each; benchmarks/objectives.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=480, help="training steps per variant, batch 64 (480: the demo's)")
    p.add_argument("--teacher", default="runs/demo/lit", help="the distillation teacher (default: the demo's LiT)")
    p.add_argument("--corpus", default="data/emoji", help="the emoji corpus (make demo builds it)")
    p.add_argument("--out", default="runs/bench_objectives", help="run folders (finished runs are reused)")
    p.add_argument("--png", default="docs/img/objectives.png", help="the plot")
    p.add_argument("--log", help="write the table here (first line: the command and the commit)")
    args = p.parse_args()
    corpus, out = (ROOT / args.corpus).resolve(), (ROOT / args.out).resolve()
    if not (corpus / "manifest.json").is_file():
        sys.exit(f"error: no corpus at {corpus}: run `make demo` first")
    results = {}
    for name, (config, extra) in variants(args.teacher).items():
        r = train(name, config, extra, args.steps, out, corpus)
        r["eval"] = evaluate(r["run"], corpus)
        results[name] = r
        print(f"{name}: done", file=sys.stderr)
    lines = [header(), f"corpus: {corpus}; {args.steps} steps of batch 64 each; template {TEMPLATE!r}", *table(results)]
    print("\n".join(lines))
    plot(results, ROOT / args.png)
    if args.log:
        Path(args.log).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
