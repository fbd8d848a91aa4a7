#!/usr/bin/env python
"""Encoding backends measured in one run (issue 31): PyTorch eager, onnxruntime fp32 and onnxruntime int8
(dynamic quantisation), on `make demo`'s LiT model (64 px hybrid ViT + MiniLM-L6) and on open_clip's
ViT-B-32 (random init: speed only; no weights are downloaded).

    python benchmarks/backends.py [--demo runs/demo/lit/checkpoints] [--index benchmarks/data/standin_1m_index]
        [--seconds 4] [--log benchmarks/results/backends_DATE.log]

1. Export: `api.export_onnx` fp32 and int8 per model (seconds, file sizes).
2. Throughput: images/s and texts/s at batch 1 and 64 per backend, torch and onnxruntime on the same
   threads (torch's: 2 here). Images are preprocessed tensors (the encoder alone); texts are distinct
   sentences, tokenised and encoded (`api.encode_texts`, as a query is).
3. The service's batched ceiling per backend (demo model): `Searcher.search` over --index one query at a
   time and in batches of 16/32/64 distinct queries, the best rate kept (serve_load.py's peer).
4. Accuracy (demo model): zero-shot top-1 and text->image R@10 on the demo's splits (held-out styles and
   unseen concepts), per backend, with int8's difference to fp32.

Run it with nothing else on the machine; it needs `make demo` (the model, its corpus, and an index of its
embeddings: runs/demo/index, or the 1M stand-in `make bench-serve` builds).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from logs import ROOT, emit, header
from watch import distinct_queries

sys.path.insert(0, str(ROOT))
from mmpretrain import api  # noqa: E402

SPLITS = {"seen": "train_styles_seen", "rendition": "rendition", "sketch": "sketch", "unseen": "unseen_concepts"}
BACKENDS = ("torch", "ort fp32", "ort int8")


def rate(fn, items_per_call: int, seconds: float) -> float:
    """Items per second of ``fn()`` over at least ``seconds`` (and two calls), after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls * items_per_call / (time.perf_counter() - start)


def export(model, root: Path) -> tuple[dict, list[str]]:
    """The three backends' models of ``model`` (exports under ``root``), and the export lines."""
    models, lines = {"torch": model}, []
    for name, quantize in (("ort fp32", None), ("ort int8", "int8")):
        start = time.perf_counter()
        out = api.export_onnx(model, root / name.replace(" ", "_"), quantize=quantize)
        seconds = time.perf_counter() - start
        sizes = ", ".join(f"{f.stem} {f.stat().st_size / 2**20:.1f} MB" for f in sorted(out.glob("*.onnx")))
        lines.append(f"  export {name}: {seconds:.1f} s ({sizes})")
        models[name] = api.load_model(out, backend="onnxruntime")
    return models, lines


def throughput(models: dict, seconds: float) -> list[str]:
    first = models["torch"]
    spec = first.input_spec("image")
    texts = distinct_queries(11)
    lines = [f"  {'backend':<9} {'img/s b1':>9} {'img/s b64':>10} {'txt/s b1':>9} {'txt/s b64':>10}"]
    base = None
    for name, model in models.items():
        row = []
        for b in (1, 64):
            images = {"image": torch.randn(b, 3, *spec.size)}
            row.append(rate(lambda: api.encode(model, "image", images), b, seconds))  # noqa: B023
        for b in (1, 64):
            row.append(rate(lambda: api.encode_texts(model, [next(texts) for _ in range(b)]), b, seconds))  # noqa: B023
        base = base or row
        ratio = " ".join(f"{r / q:.2f}x" for r, q in zip(row, base))
        lines.append(f"  {name:<9} {row[0]:9.1f} {row[1]:10.1f} {row[2]:9.1f} {row[3]:10.1f}   (x torch: {ratio})")
    return lines


def ceiling(models: dict, index: str, seconds: float) -> list[str]:
    from retrieval.jobs.index import open_index
    from retrieval.jobs.search import Searcher

    loaded = open_index(index)
    lines = [f"  index {index} ({loaded.index.ntotal:,} vectors, {loaded.header.get('description', '')})".rstrip()]
    base = None
    for name, model in models.items():
        s, queries = Searcher(model, loaded), distinct_queries(7)
        one = rate(lambda: s.search(next(queries), k=10), 1, seconds)  # noqa: B023
        best = max(rate(lambda: s.search([next(queries) for _ in range(b)], k=10), b, seconds) for b in (16, 32, 64))  # noqa: B023
        base = base or best
        lines.append(
            f"  {name:<9} one at a time {one:6.1f} q/s; batched ceiling {best:6.1f} q/s ({best / base:.2f}x torch)"
        )
    return lines


def accuracy(models: dict, corpus: Path) -> list[str]:
    from mmpretrain.eval.runner import EvalSet, embed_folder, folder_retrieval_metrics, zeroshot_metrics

    lines = [f"  {'backend':<9} " + " ".join(f"{s + ' top-1':>14} {s + ' R@10':>13}" for s in SPLITS)]
    results = {}
    for name, model in models.items():
        row = []
        for split, folder in SPLITS.items():
            data = EvalSet.parse(f"{split}@folder={corpus / 'eval' / folder}")
            fe = embed_folder(model, data, templates="a <> emoji", progress=False)
            row += [
                100 * zeroshot_metrics(fe)["top1"],
                100 * folder_retrieval_metrics(fe, ks=(10,))["text_to_image_R@10"],
            ]
        results[name] = row
        lines.append(f"  {name:<9} " + " ".join(f"{top1:14.2f} {r10:13.2f}" for top1, r10 in zip(row[::2], row[1::2])))
    delta = [a - b for a, b in zip(results["ort int8"], results["ort fp32"])]
    lines.append(
        f"  {'int8-fp32':<9} " + " ".join(f"{d1:+14.2f} {d2:+13.2f}" for d1, d2 in zip(delta[::2], delta[1::2]))
    )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="runs/demo/lit/checkpoints", help="make demo's model")
    p.add_argument("--corpus", default="data/emoji", help="make demo's corpus (its eval/ splits)")
    p.add_argument("--index", default=None, help="index of the demo model's embeddings (default: the 1M stand-in, "
                   "else runs/demo/index)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=4.0, help="each throughput figure runs at least this long")
    p.add_argument("--skip-vit-b32", action="store_true", help="the demo model only")
    p.add_argument("--log", help="write the tables here (first line: the command and the commit)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    index = args.index or next(
        (i for i in ("benchmarks/data/standin_1m_index", "runs/demo/index") if (ROOT / i / "index.json").is_file()),
        None,
    )
    lines = [header(), f"threads: torch {torch.get_num_threads()}, onnxruntime intra-op {torch.get_num_threads()}"]
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        demo = api.load_checkpoint(ROOT / args.demo)
        lines.append(f"== demo LiT model ({args.demo}, id {api.model_id(demo)})")
        models, out = export(demo, Path(tmp) / "demo")
        lines += out + ["throughput (encoder alone for images; tokenise + encode for texts):"]
        lines += throughput(models, args.seconds)
        if index:
            lines += ["service's batched ceiling (Searcher, text queries):", *ceiling(models, index, args.seconds)]
        lines += [
            "zero-shot top-1 / text->image R@10 (%), template 'a <> emoji':",
            *accuracy(models, ROOT / args.corpus),
        ]
        if not args.skip_vit_b32:
            torch.manual_seed(0)
            vit = api.create_model("ViT-B-32")
            lines.append("== open_clip ViT-B-32 (random init: speed only)")
            models, out = export(vit, Path(tmp) / "vit_b32")
            lines += out + ["throughput:", *throughput(models, args.seconds)]
    emit(lines, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
