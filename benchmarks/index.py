#!/usr/bin/env python
"""Index benchmark: every index type the builder can choose vs exact search. Data: two real sets,
``sentences`` (documentation sentences and WordNet glosses embedded by MiniLM, queried by held-out
sentences and WordNet examples; built by ``benchmarks/sentences.py``) and ``text_image`` (the demo's
LiT image tower over the emoji and icon images and their augmented views, queried by held-out
captions through its text tower; ``benchmarks/text_image.py``), and synthetic 512-d stand-ins,
clustered (1,000 Gaussian blobs: an easy case for IVF, each query's neighbours in its own blob) and
isotropic (the hard case).

    python benchmarks/index.py --data sentences --sizes 200000      # real data (after sentences.py)
    python benchmarks/index.py --data text_image --sizes 1000000    # real text->image (after text_image.py)
    python benchmarks/index.py --sizes 100000 1000000               # make bench-index (synthetic)
    python benchmarks/index.py --sizes 20000 --queries 200          # a quick look

Tuning and report queries are disjoint: for each (data set, size, index type) the search-parameter
curve (recall@10 vs exact search, batch queries/s) is swept on the tuning queries, the fastest
setting reaching recall@10 >= 0.95 there is chosen, and that setting is then measured on the report
queries: recall@10, queries/s searching them all in one batch and in batches of 64 (a service's
micro-batch; each beside exact search timed by the same rule), and p50/p99 latency of single
queries (batch 1). Also the build time, the build's peak RSS above what was resident before it,
the index size (its serialised bytes, about its RAM), and which index the automatic choice takes
under --memory.
Writes JSON and a PNG (recall vs queries/s curves) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from logs import header  # noqa: E402
from watch import status_mb  # noqa: E402

from retrieval.jobs.embed import write_vectors  # noqa: E402
from retrieval.jobs.index import INDEX_TYPES, BuildConfig, build, candidate_specs, search_in_batches  # noqa: E402
from retrieval.jobs.queries import (  # noqa: E402
    Queries,
    exact_neighbours,
    reaches,
    set_knob,
    setting_of,
    sweep,
    timed_search,
)
from retrieval.options import parse_bytes  # noqa: E402

# real sets: an embeddings folder (vectors/) with disjoint tuning and report queries, and the script that builds it
REAL = {
    "sentences": (ROOT / "benchmarks" / "data" / "sentences", "benchmarks/sentences.py"),
    "text_image": (ROOT / "benchmarks" / "data" / "text_image", "benchmarks/text_image.py"),
}


def make_data(kind: str, n: int, d: int, nq: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, d) collection, (nq, d) tuning and (nq, d) report queries, L2-normalised."""
    if kind in REAL:
        return real_set(kind, n, nq)
    rng = np.random.default_rng(seed)
    if kind == "clustered":
        centres = rng.standard_normal((1000, d)).astype(np.float32)

        def draw(m: int) -> np.ndarray:
            x = np.empty((m, d), np.float32)
            for a in range(0, m, 100_000):
                b = min(a + 100_000, m)
                x[a:b] = centres[rng.integers(0, 1000, b - a)] + rng.standard_normal((b - a, d), np.float32)
            return x
    else:

        def draw(m: int) -> np.ndarray:
            return rng.standard_normal((m, d), np.float32)

    x, tune, report = draw(n), draw(nq), draw(nq)
    for a in (x, tune, report):
        a /= np.linalg.norm(a, axis=1, keepdims=True)
    return x, tune, report


def real_set(kind: str, n: int, nq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from retrieval.jobs.embed import load_embeddings

    folder, script = REAL[kind]
    if not (folder / "vectors" / "embeddings.json").is_file():
        raise SystemExit(f"no {folder}: run `python {script}` first")
    x = load_embeddings(folder / "vectors").array()
    if n > len(x):
        raise SystemExit(f"the {kind} set has {len(x):,} vectors, not {n:,}: build more with {script}")
    tune, report = np.load(folder / "tune.npy")[:nq], np.load(folder / "report.npy")[:nq]
    return np.ascontiguousarray(x[:n]), tune, report


def latencies(index, q: np.ndarray, count: int = 300) -> tuple[float, float]:
    """p50 and p99 seconds of single-query searches (batch 1)."""
    took = []
    for row in q[:count]:
        start = time.perf_counter()
        index.search(row[None], 10)
        took.append(time.perf_counter() - start)
    return float(np.percentile(took, 50)), float(np.percentile(took, 99))


def batch_qps(index, q: np.ndarray, batch: int = 64, runs: int = 2) -> float:
    """Queries/s searching ``q`` in batches of ``batch`` (what a service's micro-batches send), fastest run."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for a in range(0, len(q), batch):
            index.search(q[a : a + batch], 10)
        best = min(best, time.perf_counter() - start)
    return len(q) / best


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM; Linux >= 4.0), so the next peak is the build's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def index_bytes(index) -> int:
    import faiss

    with tempfile.NamedTemporaryFile() as f:
        faiss.write_index(index, f.name)
        return Path(f.name).stat().st_size


def candidates(n: int, cfg: BuildConfig) -> list[str]:
    """The types the automatic choice can take at this size (HNSW only below cfg.hnsw_below)."""
    return [t for t in INDEX_TYPES.names() if t != "flat" and (t != "hnsw" or n < cfg.hnsw_below)]


def run_one(kind: str, n: int, args, workdir: Path) -> dict:
    x, tune_q, report_q = make_data(kind, n, args.dim, args.queries, args.seed)
    d = x.shape[1]
    emb = write_vectors(workdir / f"{kind}-{n}", x, part_size=250_000)
    search_in_batches()  # the product's FAISS setting, for exact search as for the indexes
    flat = faiss_flat(x)  # exact search, timed by the rule the index sweep times by (fastest of two runs)
    report_truth, exact_qps = timed_search(flat, report_q, 10, min_seconds=0)
    exact_b64 = batch_qps(flat, report_q)
    exact_p50, exact_p99 = latencies(flat, report_q)
    del flat
    tune = Queries(tune_q, exact_neighbours(x, tune_q, 10), None, "given", "tuning queries")
    report = Queries(report_q, report_truth, None, "given", "report queries")
    cfg = BuildConfig(memory_bytes=args.memory)
    auto = [spec.type for spec in candidate_specs(n, d, cfg)]
    out = {"data": kind, "n": n, "dim": d, "exact_qps": round(exact_qps, 1), "exact_qps_b64": round(exact_b64, 1),
           "exact_p50_ms": round(1e3 * exact_p50, 2),
           "exact_p99_ms": round(1e3 * exact_p99, 2), "auto_candidates": auto, "types": {}}  # fmt: skip
    print(
        f"\n== {kind}, n={n:,}, d={d}: exact search {exact_qps:,.1f} queries/s (batch of {len(report_q)}), "
        f"{exact_b64:,.1f} (batches of 64), p50/p99 "
        f"{1e3 * exact_p50:.1f}/{1e3 * exact_p99:.1f} ms (batch 1); the builder under "
        f"{args.memory / 2**30:.2f} GiB considers: {' and '.join(auto)}",
        flush=True,
    )
    for name in args.types or candidates(n, cfg):
        out["types"][name] = res = measure_type(name, emb, d, cfg, tune, report)
        res["speedup_at_0.95"] = round(res["report"]["qps"] / exact_qps, 1) if res["at_0.95"] else None
        res["speedup_b64"] = round(res["report"]["qps_b64"] / exact_b64, 1) if res["at_0.95"] else None
        print_type(name, res)
    auto_pick(out)
    return out


def faiss_flat(x: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def measure_type(name: str, emb, d: int, cfg: BuildConfig, tune: Queries, report: Queries) -> dict:
    """Build, sweep on the tuning queries, choose the fastest setting reaching 0.95 there (by the builder's
    rule: with ``cfg.recall_margin`` standard errors to spare), measure it on the report queries."""
    spec = INDEX_TYPES.get(name).builder(emb.n, d)
    rss_before, peak_ok = status_mb("self", "VmRSS")["VmRSS"], reset_peak_rss()
    t0 = time.perf_counter()
    index = build(spec, emb, Path(tempfile.mkdtemp()), cfg, progress=False)
    build_s = time.perf_counter() - t0
    # the build's peak above what was resident before it
    build_peak = status_mb("self", "VmHWM")["VmHWM"] - rss_before if peak_ok else float("nan")
    table = sweep(index, spec, tune, stop_at=0.999)  # the curve up to (near) exact recall
    ok = [row for row in table if reaches(row, 0.95, cfg.recall_margin)]
    best = max(ok, key=lambda row: row["qps"]) if ok else max(table, key=lambda row: row["recall@10"])
    for key, value in setting_of(best).items():
        set_knob(index, None if key == "exact" else key, value)
    found, qps = timed_search(index, report.vectors, report.k, min_seconds=0)
    qps_b64 = batch_qps(index, report.vectors)
    p50, p99 = latencies(index, report.vectors)
    return {
        "factory": spec.factory,
        "knob": spec.knob,
        "build_s": round(build_s, 1),
        "build_peak_rss_mib": round(build_peak, 1),
        "bytes": index_bytes(index),
        "curve": table,
        "at_0.95": best if ok else None,
        "best_recall": max(row["recall@10"] for row in table),
        "report": {
            "recall@10": round(report.recall(found), 4),
            "qps": round(qps, 1),
            "qps_b64": round(qps_b64, 1),
            "p50_ms": round(1e3 * p50, 2),
            "p99_ms": round(1e3 * p99, 2),
        },  # fmt: skip
    }


def print_type(name: str, res: dict) -> None:
    best, rep = res["at_0.95"], res["report"]
    setting = ", ".join(f"{k}={v}" for k, v in setting_of(best or {}).items())
    reach = (
        f"tuned {setting} (tuning recall {best['recall@10']:.3f}) -> report recall {rep['recall@10']:.3f}, "
        f"{res['speedup_at_0.95']}x exact ({res['speedup_b64']}x in batches of 64), "
        f"p50/p99 {rep['p50_ms']:.2f}/{rep['p99_ms']:.2f} ms"
        if best
        else f"never reaches 0.95 on the tuning queries (best {res['best_recall']:.3f})"
    )
    print(
        f"  {name:18s} {res['factory']:34s} build {res['build_s']:6.1f} s (peak RSS +{res['build_peak_rss_mib']:.0f} "
        f"MiB) {res['bytes'] / 2**20:7.1f} MiB  {reach}",
        flush=True,
    )
    print("      " + "  ".join(_row(row, res["knob"]) for row in res["curve"]), flush=True)


def _row(row: dict, knob: str | None) -> str:
    extra = "".join(f"/{k}={v}" for k, v in setting_of(row).items() if k != (knob or "exact"))
    return f"{row.get(knob or 'exact')}{extra}:{row['recall@10']:.3f}@{row['qps']:.0f}/s"


def auto_pick(out: dict) -> None:
    """What the automatic choice ends with: among its candidates, the fastest reaching 0.95 (as the builder)."""
    cands = [(name, out["types"][name]) for name in out["auto_candidates"] if name in out["types"]]
    if "flat" in out["auto_candidates"]:  # exact search, when it fits the budget, competes too
        cands.append(
            (
                "flat",
                {
                    "at_0.95": {"qps": out["exact_qps"], "recall@10": 1.0},
                    "speedup_at_0.95": 1.0,
                    "bytes": out["n"] * out["dim"] * 4,
                    "best_recall": 1.0,
                },
            )
        )
    if not cands:
        return
    reached = [(name, t) for name, t in cands if t["at_0.95"]]
    name, t = (
        max(reached, key=lambda c: c[1]["at_0.95"]["qps"]) if reached else max(cands, key=lambda c: c[1]["best_recall"])
    )
    out["auto"] = {
        "type": name,
        "speedup_at_0.95": t["speedup_at_0.95"],
        "bytes": t["bytes"],
        "recall": t.get("report", t["at_0.95"])["recall@10"] if t["at_0.95"] else t["best_recall"],
    }
    print(
        f"  -> automatic choice: {name}, {t['bytes'] / 2**30:.2f} GiB, "
        + (
            f"{t['speedup_at_0.95']}x exact search at recall@10 {out['auto']['recall']:.3f}"
            if t["at_0.95"]
            else f"best recall@10 {t['best_recall']:.3f} (0.95 out of reach)"
        ),
        flush=True,
    )


def summarize(results: list[dict], memory: int) -> int:
    """The per-type lines and the automatic choice (by today's rules, under ``memory``), from a saved run."""
    for out in results:
        print(f"\n== {out['data']}, n={out['n']:,}, d={out['dim']}: exact search {out['exact_qps']:,.1f} queries/s")
        for name, t in out["types"].items():
            reach = (
                f"{t['speedup_at_0.95']}x exact at recall {t['at_0.95']['recall@10']:.3f}"
                if t["at_0.95"]
                else f"never reaches 0.95 (best {t['best_recall']:.3f})"
            )
            print(
                f"  {name:14s} {t['factory']:38s} build {t['build_s']:7.1f} s  {t['bytes'] / 2**20:8.1f} MiB  {reach}"
            )
        out["auto_candidates"] = [
            spec.type for spec in candidate_specs(out["n"], out["dim"], BuildConfig(memory_bytes=memory))
        ]
        auto_pick(out)
    return 0


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for name, t in r["types"].items():
            ax.plot(
                [row["recall@10"] for row in t["curve"]],
                [row["qps"] for row in t["curve"]],
                "o-",
                ms=3,
                label=f"{name} ({t['bytes'] / 2**20:.0f} MiB)",
            )
        ax.axhline(r["exact_qps"], color="gray", ls="--", lw=1, label="exact")
        ax.axvline(0.95, color="gray", ls=":", lw=1)
        ax.set(
            xscale="linear",
            yscale="log",
            xlabel="recall@10",
            ylabel="queries/s (batch)",
            title=f"{r['data']}, n={r['n']:,}",
        )
        ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--data", nargs="+", default=["clustered", "isotropic"], choices=[*REAL, "clustered", "isotropic"])
    p.add_argument("--dim", type=int, default=512, help="synthetic data's dimension (real sets keep their own)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--types", nargs="*", help="index types (default: those the builder can choose at each size)")
    p.add_argument("--memory", type=parse_bytes, default=parse_bytes("2.5GB"), help="budget for the auto choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_index")
    p.add_argument("--from-json", type=Path, help="reprint the summary of an earlier run's index.json")
    args = p.parse_args()
    print(header(), flush=True)
    if args.from_json:
        return summarize(json.loads(args.from_json.read_text()), args.memory)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for kind in args.data:
                results.append(run_one(kind, n, args, Path(tmp)))
    (args.out / "index.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "index.png")
    print(f"\nwrote {args.out / 'index.json'} and {args.out / 'index.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
