#!/usr/bin/env python
"""Which queries an index is tuned on (issue 28; docs/retrieval.md "Which queries"): the demo model's
embeddings of the emoji training shards, indexed with the search parameter tuned on sampled items and
on captions (text queries, the default), each index then measured on *other* captions, held out from
tuning, and on other items. The report queries never overlap the tuning ones.

    python benchmarks/tuning_queries.py [--data data/emoji/shards] [--model runs/demo/lit/checkpoints]
        [--types ivf_flat ivf_sq8 hnsw] [--log benchmarks/results/tuning_queries_DATE.log]
    python benchmarks/tuning_queries.py --embeddings benchmarks/data/text_image/vectors \
        --types ivf_sq8 ivf_pqfs_refine          # the 1M real text->image set (benchmarks/text_image.py)

Needs `make demo` (its corpus and checkpoint). The embeddings are cached in benchmarks/data/ (not in git);
``--embeddings`` takes an embeddings folder made by the model instead of embedding ``--data``.
Columns: the index type, what it was tuned on, the tuned knob, the recall@10 the build recorded, and
recall@10 of 500 held-out caption queries and of 500 held-out item queries at that setting, vs exact.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from logs import emit, header  # noqa: E402

from mmpretrain import api  # noqa: E402
from retrieval.jobs.embed import EmbedConfig, load_embeddings, run_embed  # noqa: E402
from retrieval.jobs.index import BuildConfig, build_index, open_index  # noqa: E402
from retrieval.jobs.queries import exact_neighbours, item_queries, recall_at_k, sample_captions  # noqa: E402


def held_out_captions(emb, tuned: list[str], count: int) -> list[str]:
    """Distinct captions not among the tuning ones, in a seeded order."""
    rest = sorted(set(sample_captions(emb, emb.n, seed=0)) - set(tuned))
    return [rest[i] for i in np.random.default_rng(11).permutation(len(rest))[:count]]


def measure(folder: Path, emb, caption_q: np.ndarray, items) -> tuple[float, float]:
    index = open_index(folder).index
    truth = exact_neighbours(emb.array(), caption_q, 10)
    captions = recall_at_k(index.search(caption_q, 10)[1], truth, 10)
    return captions, items.recall(index.search(items.vectors, items.k)[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "emoji" / "shards"), help="shards with captions")
    p.add_argument("--model", default=str(ROOT / "runs" / "demo" / "lit" / "checkpoints"), help="checkpoint")
    p.add_argument("--embeddings", type=Path, help="an embeddings folder with captions, made by --model (no --data)")
    p.add_argument("--types", nargs="+", default=["ivf_flat", "ivf_sq8", "hnsw"], help="index types")
    p.add_argument("--queries", type=int, default=500, help="tuning and report queries, each (500)")
    p.add_argument("--log", help="write the table here (first line: the command and the commit)")
    args = p.parse_args()
    out = args.embeddings or ROOT / "benchmarks" / "data" / "tuning_queries_emb"
    if args.embeddings is None:
        run_embed(EmbedConfig(model=args.model, data=args.data, out=str(out), batch_size=64), progress=False)
    emb, model = load_embeddings(out), api.load_checkpoint(args.model)
    tuned = sample_captions(emb, args.queries, seed=0)  # what build_index tunes on (BuildConfig.seed 0)
    report = held_out_captions(emb, tuned, args.queries)
    caption_q = api.encode_texts(model, report).detach().float().numpy()
    items = item_queries(emb, args.queries, seed=101)  # another sample than the build's (seed 0)
    lines = [
        header(),
        f"{emb.n:,} items of {args.embeddings or args.data} embedded by {args.model} ({emb.dim}-d); "
        f"{len(tuned)} tuning captions, {len(report)} held-out report captions, {len(items.vectors)} report items",
        f"{'type':<16} {'tuned on':<10} {'knob':>28} {'recorded':>9} {'captions':>9} {'items':>7}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types:
            for tune_on in ("items", "captions"):
                cfg = BuildConfig(index_type=kind, tune_on=tune_on, queries=args.queries)
                h = build_index(out, Path(tmp) / f"{kind}-{tune_on}", cfg, progress=False)
                caps, its = measure(Path(tmp) / f"{kind}-{tune_on}", emb, caption_q, items)
                knob = ",".join(f"{k}={v}" for k, v in {h["knob"]: h["knob_value"], **h["search_params"]}.items())
                lines.append(f"{kind:<16} {tune_on:<10} {knob:>28} {h['recall@10']:>9.3f} {caps:>9.3f} {its:>7.3f}")
                print(lines[-1], flush=True)
    emit(lines, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
