#!/usr/bin/env python
"""A real text->image set of 1M vectors, made offline (issue 28): the demo's LiT model (`make demo`)
over every image of the emoji and icon-theme corpora (training images and the rendition, sketch and
unseen-concept splits: 5,583 images in the default builds), each seen once as it is (the evaluation
transform, what `retrieval embed` stores) and then in augmented views drawn by the training data ops
(random resized crop, colour jitter) until N rows are reached; queried by captions embedded by the
same model, across the modality gap, as users' text queries are. Captions are split by their text
into tuning and report queries, disjoint.

    mmpretrain data build icons --out data/icons     # once (the emoji corpus comes with `make demo`)
    python benchmarks/text_image.py [--n 1000000] [--log benchmarks/results/text_image_1m_DATE.log]

Writes ``--out`` (default benchmarks/data/text_image, not in git): ``vectors/`` (an embeddings folder
of the model's image tower, each row with its image's caption, so that `retrieval index build` tunes
on captions and `retrieval serve` answers text queries over it), ``tune.npy`` and ``report.npy``
(caption embeddings), ``queries_all.npy`` (both, for `index build --queries-file`), ``queries.json``
and ``manifest.json``. Prints, beside the build, how the set is shaped: nearest-neighbour cosines of
the originals and of the whole set, and how many source images a caption's exact top 10 spans.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from logs import emit, header  # noqa: E402
from standin import nn_cosine_quantiles  # noqa: E402

from mmpretrain import api  # noqa: E402
from mmpretrain.config.schema import OpSpec  # noqa: E402
from mmpretrain.data.ops import OpContext, apply_ops, build_ops  # noqa: E402
from retrieval.jobs.embed import write_vectors  # noqa: E402
from retrieval.jobs.queries import exact_neighbours  # noqa: E402

# the demo's zero-shot prompt per corpus (scripts/demo.py CORPORA): the caption of an evaluation image
TEMPLATES = {"emoji": "a <> emoji", "icons": "a <> icon"}
EVAL_SPLITS = ("rendition", "sketch", "unseen_concepts")  # train_styles_seen repeats the training images
# an augmented view: the training ops of configs/data/emoji.yaml, with a wider crop and more jitter
VIEW_OPS = [
    OpSpec("decode_image"),
    OpSpec("random_resized_crop", {"scale": [0.35, 1.0]}),
    OpSpec("color_jitter", {"p": 0.8}),
    OpSpec("to_tensor_normalize"),
]


def source_images(corpus: Path, name: str) -> list[tuple[str, Image.Image, str]]:
    """(key, image, caption) of every image of a built corpus: the training images with their captions,
    the evaluation splits' images with the demo's prompt for their label."""
    if not (corpus / "manifest.json").is_file():
        raise SystemExit(f"no corpus at {corpus}: `mmpretrain data build {name} --out {corpus}` (or `make demo`)")
    out = []
    with open(corpus / "train_images" / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.append((f"{name}/train/{row['file']}", corpus / "train_images" / row["file"], row["caption"]))
    for split in EVAL_SPLITS:
        for path in sorted((corpus / "eval" / split).glob("*/*")):
            label = path.parent.name.replace("_", " ")
            out.append((f"{name}/{split}/{path.parent.name}/{path.name}", path, TEMPLATES[name].replace("<>", label)))
    return [(key, Image.open(path).convert("RGB"), caption) for key, path, caption in out]


def split_captions(captions: list[str], count: int, seed: int) -> tuple[list[str], list[str]]:
    """Two disjoint sets of ``count`` distinct captions (tuning, report), in a seeded order."""
    distinct = sorted(set(captions))
    if len(distinct) < 2 * count:
        raise SystemExit(f"{len(distinct)} distinct captions: not enough for 2 x {count} queries (--queries)")
    order = np.random.default_rng(seed).permutation(len(distinct))
    return [distinct[i] for i in order[:count]], [distinct[i] for i in order[count : 2 * count]]


@torch.no_grad()
def embed_views(model, images: list[Image.Image], n: int, batch: int = 256) -> np.ndarray:
    """(n, d) rows: view 0 of every image (the evaluation transform), then augmented views 1, 2, ...,
    image by image within a view (torch's RNG draws them: seed it first)."""
    plain = api.eval_input(model, "image")
    augment = build_ops(VIEW_OPS, OpContext({"image": model.data_context().specs["image"]}), "text_image.VIEW_OPS")
    out, start = np.empty((n, model.embed_dim), np.float32), time.perf_counter()
    for a in range(0, n, batch):
        rows = range(a, min(a + batch, n))
        x = torch.stack(
            [
                plain(images[i]) if i < len(images) else apply_ops(augment, {"image": images[i % len(images)]})["image"]
                for i in rows
            ]
        )
        out[a : a + len(rows)] = api.encode(model, "image", {"image": x}).float().numpy()
        if a // batch % 400 == 0 or rows[-1] == n - 1:
            done = rows[-1] + 1
            print(f"  embedded {done:,} of {n:,} ({done / (time.perf_counter() - start):,.0f} images/s)", flush=True)
    return out


def shape_lines(vectors: np.ndarray, originals: int, keys_of, report: np.ndarray) -> list[str]:
    """How the set is shaped: nearest-neighbour cosines, and the source images behind a caption's top 10."""
    rng = np.random.default_rng(5)
    sample = vectors[rng.choice(len(vectors), min(len(vectors), 100_000), replace=False)]
    sampled = f"{len(sample):,} rows of the set" + (" (a random sample)" if len(sample) < len(vectors) else "")
    truth = exact_neighbours(vectors, report, 10)
    spans = [len({keys_of(j) for j in row}) for row in truth]
    return [
        f"nearest-neighbour cosine q10/q50/q90: the {originals:,} originals "
        f"{nn_cosine_quantiles(vectors[:originals])}, "
        f"{sampled} {nn_cosine_quantiles(sample)}",
        f"a report caption's exact top 10 comes from {np.mean(spans):.1f} distinct source images on average "
        f"(1: all views of one image; 10: ten images), median {np.median(spans):.0f}",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="rows (1,000,000)")
    p.add_argument("--model", default=str(ROOT / "runs" / "demo" / "lit" / "checkpoints"), help="checkpoint")
    p.add_argument("--corpora", nargs="+", default=["emoji", "icons"], choices=sorted(TEMPLATES))
    p.add_argument("--queries", type=int, default=1000, help="tuning and report captions, each (1,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "data" / "text_image")
    p.add_argument("--log", help="write the summary here (first line: the command and the commit)")
    args = p.parse_args()
    lines = [header()]
    print(lines[0], flush=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    model = api.load_checkpoint(args.model).eval()
    sources = [row for name in args.corpora for row in source_images(ROOT / "data" / name, name)]
    keys, images, captions = map(list, zip(*sources))
    tune, report = split_captions(captions, args.queries, args.seed)
    lines.append(
        f"{len(sources):,} source images ({', '.join(args.corpora)}), {len(set(captions)):,} distinct captions; "
        f"{args.n:,} rows = the originals + {args.n / len(sources) - 1:.1f} augmented views each on average"
    )
    print(lines[-1], flush=True)
    start = time.perf_counter()
    vectors = embed_views(model, images, args.n)
    lines.append(f"embedded {args.n:,} images in {time.perf_counter() - start:.0f} s by {args.model}")
    q = api.encode_texts(model, tune + report).float().numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [i % len(sources) for i in range(args.n)]
    write_vectors(
        args.out / "vectors",
        vectors,
        model=str(Path(args.model).resolve()),
        model_id=api.model_id(model),
        keys=[f"{keys[r]}#{i // len(sources)}" for i, r in enumerate(rows)],
        captions=[captions[r] for r in rows],
        part_size=250_000,
        modality="image",
    )
    np.save(args.out / "tune.npy", q[: len(tune)])
    np.save(args.out / "report.npy", q[len(tune) :])
    np.save(args.out / "queries_all.npy", q)
    (args.out / "queries.json").write_text(json.dumps({"tune": tune, "report": report}, indent=0))
    manifest = {"model": args.model, "corpora": args.corpora, "sources": len(sources), "rows": args.n,
                "view_ops": [[o.op, o.params] for o in VIEW_OPS], "seed": args.seed}  # fmt: skip
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    lines += shape_lines(vectors, len(sources), lambda j: j % len(sources), q[len(tune) :])
    lines.append(f"wrote {args.n:,} vectors, {len(tune)} tuning and {len(report)} report captions -> {args.out}")
    emit(lines, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
