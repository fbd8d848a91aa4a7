#!/usr/bin/env python
"""Ray's overhead on one node: the local embedding job vs ``--engine ray`` (same model, same shards,
same CPUs), and the index fill, local vs Ray, over the same vectors.

    python benchmarks/embed_scale.py                                  # 1,024 JPEGs, ViT-B-32; 1M x 512 vectors
    python benchmarks/embed_scale.py --images 256 --vectors 100000    # a quick look

Embedding: synthetic 256 px JPEG shards (8 of them), an open_clip ViT-B-32 architecture with random
weights (no download), batch 64, fp32 on the CPU. The local job runs in this process (torch's
threads = --cpus); the Ray job on a local cluster of --cpus CPUs that this script starts (its start
time is printed apart) with its defaults: one CPU model actor (1 CPU reserved) computing on every
core, decoding tasks of one CPU each taking their turns; the pair is run --repeats times,
alternating, and the median ratio printed; then once with a 1-thread actor for contrast.
items/s counts the job's loop (model loading included for Ray, whose actors load while the first
tasks decode; excluded for the local job, which loads before its loop).

Indexing: clustered 512-d vectors (benchmarks/index.py's), 10 parts; the index trained once on the
same sample, then filled by each engine (``retrieval.jobs.index.build``): IVF-Flat and fast-scan
IVF-PQ + Refine. Both indexes must answer 200 queries identically (checked).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from logs import header  # noqa: E402


def make_shards(folder: Path, images: int, shards: int, seed: int = 0) -> str:
    """``shards`` webdataset shards of ``images`` 256 px JPEGs (smooth noise and a coloured box) + captions."""
    from PIL import Image, ImageDraw
    from webdataset import TarWriter

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-images // shards)
    for s in range(shards):
        with TarWriter(str(folder / f"shard-{s:06d}.tar")) as w:
            for k in range(s * per, min(images, (s + 1) * per)):
                small = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((256, 256), Image.BILINEAR)
                box = rng.integers(0, 200, 2).tolist()
                ImageDraw.Draw(img).rectangle(
                    [*box, box[0] + 56, box[1] + 56], fill=tuple(rng.integers(0, 255, 3).tolist())
                )
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                w.write({"__key__": f"{k:07d}", "jpg": buf.getvalue(), "txt": f"a box at {box}"})
    return f"{folder}/shard-{{000000..{shards - 1:06d}}}.tar"


def bench_embed(args, work: Path) -> dict:
    import ray
    import torch

    from mmpretrain import api
    from retrieval.jobs.embed import EmbedConfig, run_embed

    torch.set_num_threads(args.cpus)
    data = make_shards(work / "shards", args.images, 8)
    model = work / "model"
    api.export_open_clip(api.create_model(args.model), model)
    common = {"model": f"local-dir:{model}", "data": data, "batch_size": 64, "device": "cpu", "dtype": "float32"}
    out = {"images": args.images, "model": args.model, "cpus": args.cpus, "runs": []}
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    out["ray_start_s"] = round(time.perf_counter() - t0, 1)
    print(f"(local ray cluster of {args.cpus} CPUs started in {out['ray_start_s']} s)", flush=True)
    try:
        for r in range(args.repeats):  # alternated, so that drifts of the machine hit both
            local = run_embed(EmbedConfig(**common, out=str(work / f"local-{r}")), progress=False)
            cfg = EmbedConfig(**common, out=str(work / f"ray-{r}"), engine="ray")
            remote = run_embed(cfg, progress=False)
            check_same(work / f"local-{r}", work / f"ray-{r}")
            ratio = remote["items_per_s"] / local["items_per_s"]
            out["runs"].append({"local": local["items_per_s"], "ray": remote["items_per_s"], "ratio": round(ratio, 2)})
            print(
                f"run {r + 1}: local {local['items_per_s']:.1f} items/s, ray {remote['items_per_s']:.1f} items/s "
                f"= {ratio:.2f}x local (same vectors)",
                flush=True,
            )
        one = run_embed(EmbedConfig(**common, out=str(work / "ray-1t"), engine="ray", actor_threads=1), progress=False)
        out["ray_1_thread"] = one["items_per_s"]
        print(f"ray with a 1-thread actor: {one['items_per_s']:.1f} items/s", flush=True)
    finally:
        ray.shutdown()
    out["ratio_median"] = float(np.median([run["ratio"] for run in out["runs"]]))
    print(f"=> ray / local, median of {args.repeats}: {out['ratio_median']:.2f}x", flush=True)
    return out


def check_same(a: Path, b: Path) -> None:
    from retrieval.jobs.embed import load_embeddings

    ea, eb = load_embeddings(a), load_embeddings(b)
    assert ea.n == eb.n and np.abs(ea.array() - eb.array()).max() < 1e-3, "the engines disagree"


def bench_index(args, work: Path) -> dict:
    import faiss
    import ray
    from index import make_data

    from retrieval.jobs.embed import write_vectors
    from retrieval.jobs.index import INDEX_TYPES, BuildConfig, build

    x, q, _ = make_data("clustered", args.vectors, 512, 200, 0)
    emb = write_vectors(work / "vectors", x, part_size=max(1, args.vectors // 10))
    del x
    out = {"n": args.vectors}
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        for name in ("ivf_flat", "ivf_pqfs_refine"):
            spec, answers, row = INDEX_TYPES.get(name).builder(emb.n, emb.dim), [], {}
            for engine in ("local", "ray"):
                folder = work / f"ix-{name}-{engine}"
                folder.mkdir()
                start = time.perf_counter()
                index = build(spec, emb, folder, BuildConfig(engine=engine), progress=False)
                row[engine] = round(time.perf_counter() - start, 1)
                faiss.ParameterSpace().set_index_parameters(index, "nprobe=16")
                answers.append(index.search(q, 10)[1])
                del index
            assert (answers[0] == answers[1]).mean() > 0.999, "the engines' indexes answer differently"
            row["ratio"] = round(row["local"] / row["ray"], 2)
            out[name] = row
            print(
                f"index {name} ({spec.factory}), {emb.n:,} x 512: train + fill local {row['local']} s, "
                f"ray {row['ray']} s ({row['ratio']}x local's speed); same answers",
                flush=True,
            )
    finally:
        ray.shutdown()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--vectors", type=int, default=1_000_000, help="index benchmark size (0: skip)")
    p.add_argument("--repeats", type=int, default=2, help="local/ray pairs of embedding runs (2)")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args()
    print(header(), flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_embed:
            results["embed"] = bench_embed(args, Path(tmp) / "embed")
        if args.vectors:
            results["index"] = bench_index(args, Path(tmp) / "index")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
