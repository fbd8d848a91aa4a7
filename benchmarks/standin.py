#!/usr/bin/env python
"""A synthetic stand-in for real embeddings, calibrated against them, for scales real data does not
reach on this machine (issue 28): N vectors drawn from a Gaussian with the real set's mean and full
covariance, normalised (no blobs: the neighbours of a point are spread as the real set's are, not
copies of one centre). It is written as an embeddings folder of the real set's model (same model id),
so ``retrieval index build`` and ``retrieval serve`` take it as they take a real one. Labelled a
stand-in wherever its figures are quoted.

    python benchmarks/standin.py REAL_EMBEDDINGS OUT [--n 1000000] [--seed 0]

Calibration, printed (and checked against the real set at its own size): the nearest-neighbour cosine
quantiles (10/50/90%) of the real set and of a stand-in sample of the same size, and the recall@10 of
IVF at a few nprobe for text-like queries (held-out real vectors as queries) on both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from logs import header  # noqa: E402

PART = 100_000


def real_vectors(folder: Path) -> tuple[np.ndarray, dict]:
    from retrieval.jobs.embed import load_embeddings

    x = load_embeddings(folder).array().astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), json.loads((folder / "embeddings.json").read_text())


class Standin:
    """The fitted Gaussian (mean and a square root of the covariance of the real unit vectors), drawn
    in groups as real collections come (several views of one concept): each group's centre from the
    Gaussian with (1 - a^2) of the covariance, its ``group`` members around it with a^2 of it (the
    total covariance is the real one at any a); a is calibrated so that the nearest-neighbour cosine
    median at the real set's size matches the real set's."""

    def __init__(self, real: np.ndarray, group: int, rng: np.random.Generator):
        self.mean, self.group = real.mean(0), group
        _, s, vt = np.linalg.svd(real - self.mean, full_matrices=False)
        self.root = (vt.T * (s / np.sqrt(len(real) - 1))).astype(np.float32)  # (d, r): cov = root @ root.T
        want, self.a = nn_cosine_quantiles(real)[1], 1.0
        grid = [round(a, 2) for a in np.arange(0.05, 1.0001, 0.05)]
        self.a = min(grid, key=lambda a: abs(self._median_at(a, len(real), rng) - want))

    def _median_at(self, a: float, n: int, rng: np.random.Generator) -> float:
        self.a = a
        return nn_cosine_quantiles(self.sample(n, rng))[1]

    def _gauss(self, n: int, scale: float, rng: np.random.Generator) -> np.ndarray:
        return scale * (rng.standard_normal((n, self.root.shape[1]), dtype=np.float32) @ self.root.T)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        centres = self.mean + self._gauss(-(-n // self.group), np.sqrt(1 - self.a**2), rng)
        x = np.repeat(centres, self.group, axis=0)[:n] + self._gauss(n, self.a, rng)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def nn_cosine_quantiles(x: np.ndarray) -> list[float]:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores, _ = index.search(x, 2)
    return [round(float(q), 3) for q in np.quantile(scores[:, 1], [0.1, 0.5, 0.9])]


def ivf_recall(base: np.ndarray, queries: np.ndarray, nprobes=(1, 4, 16)) -> list[float]:
    import faiss

    d, k = base.shape[1], 10
    exact = faiss.IndexFlatIP(d)
    exact.add(base)
    _, truth = exact.search(queries, k)
    nlist = max(4, int(4 * np.sqrt(len(base))) // 4 * 4)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(base)
    ivf.add(base)
    out = []
    for p in nprobes:
        ivf.nprobe = p
        _, got = ivf.search(queries, k)
        out.append(round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)])), 3))
    return out


def write(out: Path, vectors_of, n: int, head: dict) -> None:
    """An embeddings folder of ``n`` vectors (parts of 100,000), no thumbnails, captions empty."""
    from retrieval.jobs.embed import _write_part, part_name

    (out / "parts").mkdir(parents=True, exist_ok=True)
    sources = [f"standin-{i}" for i in range(-(-n // PART))]  # one part per source, as `retrieval embed` writes
    for i, start in enumerate(range(0, n, PART)):
        count = min(PART, n - start)
        rows = {
            "key": [f"standin-{start + j:08d}" for j in range(count)],
            "caption": [""] * count,
            "source": [sources[i]] * count,
            "modality": [head["modality"]] * count,
            "thumb_offset": [0] * count,
            "thumb_len": [0] * count,
            "width": [0] * count,
            "height": [0] * count,
        }
        summary = {"source": sources[i], "items": count, "skipped": {}, "complete": True}
        _write_part(out / "parts" / part_name(i), vectors_of(count), rows, b"", head["dtype"], summary)
    meta = {**head, "data": "standin", "sources": sources, "standin_of": head.get("data")}
    (out / "embeddings.json").write_text(json.dumps(meta, indent=2))


def write_text_queries(real: Path, head: dict, out: Path) -> None:
    """The real set's distinct captions embedded by its model (queries across the modality gap, as
    users' text queries are): ``index build --queries-file`` tunes on them."""
    from mmpretrain import api
    from retrieval.jobs.embed import load_embeddings

    captions = sorted({c for c in load_embeddings(real).meta().column("caption").to_pylist() if c})
    q = api.encode_texts(api.load_checkpoint(head["model"]), captions).detach().float().numpy()
    np.save(out, q.astype(np.float32))
    print(f"text queries: {len(captions)} distinct captions embedded by {head['model']} -> {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("real", type=Path, help="an embeddings folder of real vectors (retrieval embed)")
    p.add_argument("out", type=Path, help="the stand-in's embeddings folder")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--text-queries", type=Path, help="also write the real set's captions, embedded by its model, here (.npy)"
    )
    p.add_argument("--group", type=int, default=5, help="members per group (the emoji corpus: ~5 styles a concept)")
    args = p.parse_args()
    print(header(), flush=True)
    real, head = real_vectors(args.real)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(real))
    queries, base = real[order[: len(real) // 5]], real[order[len(real) // 5 :]]
    fit = Standin(base, args.group, rng)
    fake = fit.sample(len(base), rng)
    print(
        f"real: {len(real)} x {real.shape[1]} from {head.get('data')}; stand-in fitted on {len(base)}: groups of "
        f"{args.group}, within-group share of the covariance a^2 = {fit.a**2:.2f} (a = {fit.a})"
    )
    print(
        f"nearest-neighbour cosine q10/q50/q90: real {nn_cosine_quantiles(base)}, stand-in {nn_cosine_quantiles(fake)}"
    )
    print(
        f"IVF recall@10 at nprobe 1/4/16, held-out real queries: real {ivf_recall(base, queries)}, "
        f"stand-in {ivf_recall(fake, queries)}"
    )
    if args.text_queries:
        write_text_queries(args.real, head, args.text_queries)
    write(args.out, lambda count: fit.sample(count, rng), args.n, head)
    print(f"wrote {args.n:,} stand-in vectors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
