"""The index types, by registry (``INDEX_TYPES``), and the automatic choice among them: each entry turns a
collection's size and dimension into an ``IndexSpec`` (a FAISS factory string, the search knob and its
values, the memory it needs); ``candidate_specs`` lists what a build within ``BuildConfig``'s memory budget
tries, best first (the reasoning is in ``retrieval.jobs.index``'s docstring)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from retrieval.errors import IndexError_
from retrieval.jobs.index_config import INDEX_TYPES, BuildConfig


@dataclass(frozen=True)
class IndexSpec:
    """``factory``: FAISS index-factory string; ``knob``: the search parameter tuned for recall."""

    type: str
    factory: str
    memory_bytes: int  # estimated RAM of the built index
    knob: str | None = None
    knob_values: tuple[int, ...] = ()
    train_size: int = 0  # vectors sampled for training (0: no training)
    on_disk_ok: bool = False
    param_grid: tuple[tuple[tuple[str, int], ...], ...] = ((),)  # settings of other search parameters to try


def probes(nlist: int) -> tuple[int, ...]:
    """nprobe values to try: powers of two up to every cell (exact within the IVF)."""
    return tuple(2**i for i in range(int(math.log2(nlist)) + 1))


def nlist_for(n: int) -> int:
    """IVF cells: ~4 sqrt(n), a power of two, with >= 39 training points per cell available."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(n), 16)))
    while nlist > 16 and n < 39 * nlist:
        nlist //= 2
    return int(nlist)


# the refine stages' shortlist factor (k x f candidates re-ranked), tuned with the search parameter.
# Re-ranking dominates the search time (~0.2 us a candidate at d=512), so the grid steps by 1.33-1.5x
# throughout: on the 1M real text->image set the target fell between 64 and 128, and a step of 2x there
# cost the builder's choice about a third of its speed.
REFINE_GRID = tuple((("k_factor_rf", f),) for f in (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256))


def pq_m(d: int) -> int:
    """PQ sub-quantizers: d/8 bytes a vector (64 for 512-d), a divisor of d."""
    m = max(d // 8, 1)
    while d % m:
        m -= 1
    return m


def _ivf(
    name: str,
    n: int,
    d: int,
    codes: str,
    code_bytes: int,
    *,
    pre: str = "",
    extra_bytes: int = 0,
    min_train: int = 0,
    **kw,
) -> IndexSpec:
    """An IVF spec: ``{pre}IVF{nlist},{codes}``, ``code_bytes`` + an 8-byte id a vector plus the
    centroids (and ``extra_bytes``), nprobe tuned over ``probes``, trained on 50 vectors a cell
    (at least ``min_train``)."""
    nlist = nlist_for(n)
    return IndexSpec(
        name,
        f"{pre}IVF{nlist},{codes}",
        n * (code_bytes + 8) + nlist * d * 4 + extra_bytes,
        "nprobe",
        probes(nlist),
        min(n, max(50 * nlist, min_train)),
        **kw,
    )


PQ_TRAIN = 256 * 64  # product quantizers want >= 256 points a centroid of 64 sub-quantizers


@INDEX_TYPES.register("flat", example={"n": 20_000, "d": 32, "recall_floor": 1.0, "self_hit": 0.8})
def flat(n: int, d: int) -> IndexSpec:
    """Exact search."""
    return IndexSpec("flat", "Flat", n * d * 4)


@INDEX_TYPES.register("hnsw", example={"n": 20_000, "d": 32, "recall_floor": 0.95, "self_hit": 0.8})
def hnsw(n: int, d: int) -> IndexSpec:
    """HNSW graph (M=32) over the raw vectors: fast and accurate, slow to build, all in RAM."""
    return IndexSpec(
        "hnsw", "HNSW32", n * (d * 4 + 2 * 32 * 4 + 16), "efSearch", (16, 32, 64, 128, 256, 512, 1024, 2048)
    )


@INDEX_TYPES.register("ivf_flat", example={"n": 20_000, "d": 32, "recall_floor": 0.95, "self_hit": 0.8})
def ivf_flat(n: int, d: int) -> IndexSpec:
    """Inverted file over raw vectors."""
    return _ivf("ivf_flat", n, d, "Flat", 4 * d, on_disk_ok=True)


@INDEX_TYPES.register("ivf_pq_refine", example={"n": 20_000, "d": 32, "recall_floor": 0.75, "self_hit": 0.8})
def ivf_pq_refine(n: int, d: int) -> IndexSpec:
    """OPQ rotation + IVF-PQ (d/8 bytes) shortlist, re-ranked on 8-bit scalar-quantised vectors."""
    m = pq_m(d)
    return _ivf(
        "ivf_pq_refine",
        n,
        d,
        f"PQ{m}x8,Refine(SQ8)",
        m + d,
        pre=f"OPQ{m}_{d},",
        extra_bytes=d * d * 4,
        min_train=PQ_TRAIN,
        param_grid=REFINE_GRID,
    )


@INDEX_TYPES.register("ivf_sq8", example={"n": 20_000, "d": 32, "recall_floor": 0.9, "self_hit": 0.8})
def ivf_sq8(n: int, d: int) -> IndexSpec:
    """Inverted file over 8-bit scalar-quantised residuals (d bytes a vector, a quarter of IVF-Flat):
    the lists are scanned in order (1M real sentence embeddings, held-out queries: 6-7x exact
    search at recall@10 0.95, where a fast-scan shortlist is 30x; on synthetic 1M blobs, an
    oracle for IVF, 87x; benchmarks/index.py). Recall tops out near 0.98 (the 8-bit rounding)."""
    return _ivf("ivf_sq8", n, d, "SQ8", d, on_disk_ok=True)


@INDEX_TYPES.register("ivf_rabitq_refine", example={"n": 20_000, "d": 32, "recall_floor": 0.75, "self_hit": 0.8})
def ivf_rabitq_refine(n: int, d: int) -> IndexSpec:
    """IVF with RaBitQ codes (1 bit a dimension of the residual, plus two floats: d/8 + 8 bytes a
    vector; its distance estimates have a bounded error, so a short shortlist suffices) re-ranked on
    8-bit scalar-quantised vectors (1M real sentence embeddings, held-out queries: 10.5-13.4x exact search
    at recall@10 0.95, where the fast-scan shortlist is 30-33x; benchmarks/index.py)."""
    return _ivf(
        "ivf_rabitq_refine", n, d, "RaBitQ,Refine(SQ8)", d // 8 + 8 + d, min_train=PQ_TRAIN, param_grid=REFINE_GRID
    )


@INDEX_TYPES.register("ivf_pqfs_refine", example={"n": 20_000, "d": 32, "recall_floor": 0.75, "self_hit": 0.8})
def ivf_pqfs_refine(n: int, d: int) -> IndexSpec:
    """IVF with fast-scan PQ of the residuals (d/4 sub-quantizers of 4 bits, scanned with SIMD: d/8
    bytes a vector) as the shortlist, re-ranked on 8-bit scalar-quantised vectors: the same memory as
    ``ivf_pq_refine``. ``x4fsr``: residual codes (``x4fs`` codes the raw vectors, recall@10 0.01 lower)."""
    m = max(2, (d // 4) - (d // 4) % 2)
    while d % m:
        m -= 2
    return _ivf(
        "ivf_pqfs_refine", n, d, f"PQ{m}x4fsr,Refine(SQ8)", m // 2 + d, min_train=PQ_TRAIN, param_grid=REFINE_GRID
    )


@INDEX_TYPES.register("ivf_pq", example={"n": 20_000, "d": 32, "recall_floor": 0.15, "self_hit": 0.2})
def ivf_pq(n: int, d: int) -> IndexSpec:
    """OPQ + IVF-PQ alone: the smallest (d/8 bytes a vector); recall@10 can top out low (0.70 on 200k
    real sentence embeddings, d=384; benchmarks/index.py --data sentences)."""
    m = pq_m(d)
    return _ivf(
        "ivf_pq", n, d, f"PQ{m}x8", m, pre=f"OPQ{m}_{d},", extra_bytes=d * d * 4, min_train=PQ_TRAIN, on_disk_ok=True
    )


# measured beside the first fitting type, when they fit too, and the fastest at the target kept:
# HNSW or IVF-Flat (which wins depends on the data); IVF-Flat or IVF-SQ8 (a quarter of the memory and
# faster, but recall tops out near 0.98); IVF-SQ8 or a compressed shortlist re-ranked on the same
# 8-bit codes (more memory; it scans 1-bit / 4-bit codes, so it can win where many lists are probed)
RIVALS = {  # measured beside the first fitting type; the fastest at the recall target is kept
    "hnsw": ("ivf_flat",),
    # real sentence embeddings (1M, held-out queries: benchmarks/results/index_sentences_1m_2026-12-07c.log)
    # need nprobe 128-256 of 4096 for 0.95: there the fast-scan shortlist is 29.7x exact search, IVF-SQ8 6.2x
    "ivf_flat": ("ivf_sq8", "ivf_pqfs_refine"),
    "ivf_sq8": ("ivf_rabitq_refine", "ivf_pqfs_refine"),
}


def candidate_specs(n: int, d: int, cfg: BuildConfig) -> list[IndexSpec]:
    """The indexes worth building for ``n`` vectors of dimension ``d`` under ``cfg`` (see module doc).

    The first fitting approximate index and its ``RIVALS`` that fit too: below ``cfg.hnsw_below``
    vectors HNSW and IVF-Flat, since which is faster at the recall target depends on the data
    (IVF-Flat on well-clustered embeddings, HNSW on diffuse ones). Exact search joins them when it
    fits the budget: on diffuse, high-dimensional data no approximate index beats brute force at
    high recall, and the builder keeps whichever measures fastest at the target.
    """
    if cfg.index_type != "auto":
        return [INDEX_TYPES.get(cfg.index_type).builder(n, d)]
    if cfg.on_disk:
        return [ivf_flat(n, d) if n >= cfg.flat_below else flat(n, d)]
    if n < cfg.flat_below:
        return [flat(n, d)]
    order = (["hnsw"] if n < cfg.hnsw_below else []) + ["ivf_flat", "ivf_sq8", "ivf_pq"]
    specs = [INDEX_TYPES.get(name).builder(n, d) for name in order]
    fitting = [spec for spec in specs if spec.memory_bytes <= cfg.memory_bytes]
    if not fitting:
        raise IndexError_(
            f"no index of {n:,} vectors (d={d}) fits {cfg.memory_bytes / 2**30:.2f} GiB: the smallest "
            f"(ivf_pq) needs {specs[-1].memory_bytes / 2**30:.2f} GiB; raise --memory or build --on-disk"
        )
    rivals = [INDEX_TYPES.get(name).builder(n, d) for name in RIVALS.get(fitting[0].type, ())]
    chosen = fitting[:1] + [spec for spec in rivals if spec.memory_bytes <= cfg.memory_bytes]
    exact = flat(n, d)
    return chosen + ([exact] if exact.memory_bytes <= cfg.memory_bytes else [])


def choose_index(n: int, d: int, cfg: BuildConfig) -> IndexSpec:
    """The first candidate (what is built when only one is)."""
    return candidate_specs(n, d, cfg)[0]


def spec_dict(spec: IndexSpec) -> dict:
    return asdict(spec)
