"""Curation figures: dedup precision/recall on a corpus with injected near-duplicates, dedup time per
100k vectors (exact range search vs kNN on an index, same run), and the CLIP-score histogram of a
training collection.

    python benchmarks/curate.py --model runs/demo/lit/checkpoints --images data/emoji/train_images \
        --shards data/emoji/shards --out runs/curate

Near-duplicates: a seeded 10% of the images each get three copies: a JPEG re-encode at quality 60,
a crop removing 5% of each side, and a resize to 90% of each side (captions copied). Precision is
the share of removed items that are injected copies; recall the share of copies removed (keep rule
``first``: the originals come first). Removed originals are reported apart, with how many share
their keeper's concept (the corpus's own near-copies: one emoji drawn alike in two styles).
Run it with nothing else on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from logs import header  # noqa: E402

THRESHOLDS = (0.90, 0.92, 0.94, 0.96, 0.98)
KINDS = ("jpeg60", "crop5", "resize90")


def copy_of(img: Image.Image, kind: str) -> Image.Image:
    img = img.convert("RGB")
    w, h = img.size
    if kind == "jpeg60":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=60)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "crop5":
        dx, dy = max(1, round(0.05 * w)), max(1, round(0.05 * h))
        return img.crop((dx, dy, w - dx, h - dy))
    return img.resize((round(0.9 * w), round(0.9 * h)), Image.BICUBIC)


def injected_corpus(images: Path, out: Path, fraction: float, seed: int) -> dict[str, str]:
    """``out/images`` + ``out/captions.csv``: every image, then copies of a seeded ``fraction``;
    returns copy file -> original file."""
    rows = list(csv.DictReader(open(images / "captions.csv", encoding="utf-8")))
    rng = random.Random(seed)
    chosen = rng.sample(range(len(rows)), round(fraction * len(rows)))
    (out / "images").mkdir(parents=True, exist_ok=True)
    truth, out_rows = {}, []
    for r in rows:
        dst = out / "images" / r["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(images / r["file"]).convert("RGB").save(dst.with_suffix(".png"))
        out_rows.append({"file": str(Path(r["file"]).with_suffix(".png")), "caption": r["caption"]})
    for i in chosen:
        src = Path(rows[i]["file"]).with_suffix(".png")
        for kind in KINDS:
            name = f"copies/{kind}/{src.stem}_{i}.png"
            (out / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            copy_of(Image.open(out / "images" / src), kind).save(out / "images" / name)
            out_rows.append({"file": name, "caption": rows[i]["caption"]})
            truth[name] = str(src)
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["file", "caption"])
        w.writeheader()
        w.writerows(out_rows)
    return truth


def dedup_quality(emb_folder: Path, truth: dict[str, str], out: Path) -> list[dict]:
    """Precision/recall of removal at each threshold (exact range search, keep first)."""
    import pyarrow.parquet as pq

    from retrieval.jobs.curate import DedupConfig, dedup, item_table
    from retrieval.jobs.embed import load_embeddings

    table = item_table(load_embeddings(emb_folder))
    files = table.column("source").to_pylist()  # the shard writer's json source: the image file
    rows = []
    for t in THRESHOLDS:
        r = dedup(emb_folder, out / f"keep_{t:.2f}.parquet", DedupConfig(threshold=t), progress=False)
        kept = set(pq.read_table(out / f"keep_{t:.2f}.parquet").column("id").to_pylist())
        removed = [files[i] for i in range(len(files)) if i not in kept]
        copies = [f for f in removed if f in truth]
        per_kind = {
            k: sum(f.startswith(f"copies/{k}/") for f in copies) / sum(f.startswith(f"copies/{k}/") for f in truth)
            for k in KINDS
        }
        same = same_concept_removals(out / f"keep_{t:.2f}.groups.parquet", files, truth)
        rows.append(
            {
                "threshold": t,
                "removed": len(removed),
                "copies_removed": len(copies),
                "precision": len(copies) / max(len(removed), 1),
                "recall": len(copies) / len(truth),
                **{f"recall_{k}": v for k, v in per_kind.items()},
                "originals_removed": len(removed) - len(copies),
                "originals_removed_same_concept": same,
                "precision_same_concept_counted": (len(copies) + same) / max(len(removed), 1),
                "seconds": r["seconds"],
            }
        )
    return rows


def same_concept_removals(groups: Path, files: list[str], truth: dict[str, str]) -> int:
    """Removed originals whose group's keeper is the same concept (``STYLE/SLUG.png``: same slug)."""
    import pyarrow.parquet as pq

    g = pq.read_table(groups).to_pydict()
    keeper = {grp: i for i, grp, kept in zip(g["id"], g["group"], g["kept"]) if kept}

    def concept(f: str) -> str:
        return Path(truth.get(f, f)).stem

    return sum(
        1
        for i, grp, kept in zip(g["id"], g["group"], g["kept"])
        if not kept and files[i] not in truth and concept(files[i]) == concept(files[keeper[grp]])
    )


GROUP_SIZES = (2, 3, 5, 8)  # injected near-duplicate groups: an original and 1, 2, 4 or 7 copies


def injected_vectors(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, list[set[int]]]:
    """n x d clustered vectors in which 1% of the ids form near-duplicate groups of GROUP_SIZES (each
    copy is its original plus noise of norm ~0.1: cosine ~0.995); returns the vectors and the groups."""
    from tests.conftest import clustered

    rng = np.random.default_rng(seed)
    x = clustered(n, d, max(n // 50, 1), seed=seed, spread=0.3)
    ids, groups, used, g = rng.permutation(n), [], 0, 0
    while used < n // 100:
        size = GROUP_SIZES[g % len(GROUP_SIZES)]
        members = ids[used : used + size]
        noise = rng.standard_normal((size - 1, d)).astype(np.float32)
        x[members[1:]] = x[members[0]] + 0.1 / np.sqrt(d) * noise
        groups.append(set(members.tolist()))
        used, g = used + size, g + 1
    return x, groups


def found_groups(out: Path) -> list[set[int]]:
    """The groups a dedup wrote (``<keep>.groups.parquet``: id, group), as sets of ids."""
    import pyarrow.parquet as pq

    from retrieval.jobs.curate import groups_path

    t = pq.read_table(groups_path(out)).to_pydict()
    by: dict[int, set[int]] = {}
    for i, g in zip(t["id"], t["group"]):
        by.setdefault(g, set()).add(i)
    return [m for m in by.values() if len(m) > 1]


def dedup_speed(n: int, d: int, out: Path) -> dict:
    """Seconds for exact range search and for kNN on an IVF-Flat index (its build included) over n x d
    clustered vectors with injected groups of several sizes; the groups each finds, compared with each
    other and with the injected ones."""
    from retrieval.jobs.curate import DedupConfig, dedup
    from retrieval.jobs.embed import write_vectors
    from retrieval.jobs.index import BuildConfig, build_index

    x, injected = injected_vectors(n, d)
    emb = write_vectors(out / f"vec{n}", x)
    t0 = time.perf_counter()
    build_index(emb.folder, out / f"ix{n}", BuildConfig(index_type="ivf_flat"), progress=False)
    build_s = time.perf_counter() - t0
    exact = dedup(emb.folder, out / "sx.parquet", DedupConfig(threshold=0.94), progress=False)
    knn = dedup(emb.folder, out / "sk.parquet", DedupConfig(threshold=0.94, index=str(out / f"ix{n}")), progress=False)
    gx, gk = found_groups(out / "sx.parquet"), found_groups(out / "sk.parquet")
    same = {frozenset(g) for g in gx} & {frozenset(g) for g in gk}
    return {
        "n": n,
        "d": d,
        "injected_groups": {s: sum(len(g) == s for g in injected) for s in GROUP_SIZES},
        "exact_s": exact["seconds"],
        "index_s": knn["seconds"],
        "index_build_s": round(build_s, 1),
        "speedup": exact["seconds"] / knn["seconds"],
        "speedup_with_build": exact["seconds"] / (knn["seconds"] + build_s),
        "exact_groups": len(gx),
        "index_groups": len(gk),
        "same_groups": len(same),
        "injected_recovered_exact": sum(any(g <= f for f in gx) for g in injected),
        "injected_recovered_index": sum(any(g <= f for f in gk) for g in injected),
        "exact_removed": exact["removed"],
        "index_removed": knn["removed"],
    }


def speed_line(s: dict) -> str:
    sizes = ", ".join(f"{c} of {k}" for k, c in s["injected_groups"].items())
    return (
        f"dedup of {s['n']:,} x {s['d']} vectors with injected groups ({sizes}): exact range search "
        f"{s['exact_s']:.1f} s; kNN (k=32) on IVF-Flat {s['index_s']:.1f} s + {s['index_build_s']:.1f} s to build "
        f"the index: {s['speedup']:.1f}x without the build, {s['speedup_with_build']:.1f}x with it. Groups found: "
        f"exact {s['exact_groups']}, index {s['index_groups']}, identical {s['same_groups']}; injected groups "
        f"found whole: exact {s['injected_recovered_exact']}, index {s['injected_recovered_index']} of "
        f"{sum(s['injected_groups'].values())}; removed {s['exact_removed']} vs {s['index_removed']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/lit/checkpoints")
    p.add_argument("--images", default="data/emoji/train_images", help="image folder with captions.csv")
    p.add_argument("--shards", default="data/emoji/shards", help="training shards for the CLIP-score histogram")
    p.add_argument("--out", default="runs/curate")
    p.add_argument("--fraction", type=float, default=0.10, help="images given injected copies (0.10)")
    p.add_argument("--speed-n", type=int, default=100_000, help="vectors for the timing (100k)")
    p.add_argument("--min-score", type=float, default=0.28)
    args = p.parse_args()
    print(header(), flush=True)
    from mmpretrain import api
    from retrieval.jobs.curate import FilterConfig, filter_items
    from retrieval.jobs.embed import EmbedConfig, run_embed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    truth = injected_corpus(Path(args.images), out / "injected", args.fraction, seed=0)
    api.make_shards(
        out / "injected" / "images", out / "injected" / "captions.csv", out / "injected_shards", progress=False
    )
    run_embed(EmbedConfig(model=args.model, data=str(out / "injected_shards"), out=str(out / "injected_emb")))
    rows = dedup_quality(out / "injected_emb", truth, out)
    print(f"dedup on {args.images} with {len(truth)} injected copies ({', '.join(KINDS)}), keep first:")
    head = "threshold  removed  precision  recall  " + "  ".join(f"recall_{k}" for k in KINDS)
    print(head + "  originals_removed (same concept)  precision_same_concept_counted")
    for r in rows:
        print(
            f"{r['threshold']:<9.2f}  {r['removed']:<7d}  {r['precision']:<9.3f}  {r['recall']:<6.3f}  "
            + "  ".join(f"{r[f'recall_{k}']:<{len(k) + 7}.3f}" for k in KINDS)
            + f"  {r['originals_removed']} ({r['originals_removed_same_concept']})"
            + f"  {r['precision_same_concept_counted']:.3f}"
        )
    speed = dedup_speed(args.speed_n, 512, out) if args.speed_n else None
    print("dedup timing skipped (--speed-n 0)" if speed is None else speed_line(speed))
    run_embed(EmbedConfig(model=args.model, data=args.shards, out=str(out / "train_emb")))
    f = filter_items(out / "train_emb", out / "train_keep.parquet", FilterConfig(min_score=args.min_score))
    q = f["score_quantiles"]
    print(
        f"CLIP scores of {f['items']:,} training items under {args.model}: median {q['p50']:.3f} "
        f"(p5 {q['p5']:.3f}, p95 {q['p95']:.3f}); {f['kept']:,} >= {args.min_score}; histogram {f['histogram']}"
    )
    (out / "curate.json").write_text(json.dumps({"dedup": rows, "speed": speed, "filter": f}, indent=2))


if __name__ == "__main__":
    main()
