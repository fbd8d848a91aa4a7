"""FAISS indexes over embedding jobs: automatic choice, training, tuning, atomic save, checked load.

Index folder::

    index.faiss      the FAISS index (inner product on L2-normalised vectors)
    index.ivfdata    inverted lists on disk (only for --on-disk builds)
    meta.parquet     one row per id: key, caption, source, modality, part, thumb_offset, thumb_len
    index.json       format version, spec and tuned search parameter, recall@10 vs exact search,
                     model id, dimension, memory, sha256 of every file (verified on load)

The choice follows autofaiss's reasoning on FAISS's index factory directly: exact search for
small collections; HNSW while the graph fits; IVF-Flat while the raw vectors fit the memory
budget; IVF over 8-bit scalar-quantised residuals (d bytes a vector) below that; then a
compressed shortlist with a re-ranking stage on such 8-bit codes (Refine(SQ8)): RaBitQ (1 bit a
dimension), fast-scan PQ and OPQ + IVF-PQ, since compressed codes alone top out far below high
recall (IVF-PQ alone: recall@10 0.70 at most on 200k real sentence embeddings; benchmarks/index.py).
The search parameter (nprobe / efSearch) is tuned on held-out queries to the recall target.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from faiss.contrib.ondisk import merge_ondisk
from tqdm import tqdm

from mmpretrain import api
from retrieval.errors import IndexError_
from retrieval.jobs import checksums, shards
from retrieval.jobs.embed import load_embeddings, relative_path
from retrieval.jobs.gpu import gpu_training, use_gpu
from retrieval.jobs.index_config import FILL_ENGINES, TUNE_ON, BuildConfig  # noqa: F401 (part of this module's surface)
from retrieval.jobs.index_types import (  # noqa: F401 (part of this module's surface)
    INDEX_TYPES,
    IndexSpec,
    candidate_specs,
    choose_index,
    nlist_for,
    pq_m,
    probes,
    spec_dict,
)
from retrieval.jobs.queries import (  # noqa: F401 (exact_neighbours, recall_at_k, sweep: part of this module's surface)
    Queries,
    QueryError_,
    Tuning,
    exact_neighbours,
    item_queries,
    recall_at_k,
    set_knob,
    sweep,
    tune,
    tuning_queries,
)

log = logging.getLogger(__name__)
FORMAT = "mmpretrain-index/1"


# FAISS 1.15 computes exact inner products of fewer than ~512 queries one query at a time (SIMD)
# rather than by BLAS; a service's micro-batches (16-64) are that small: with BLAS from 20 queries
# (FAISS's long-standing default) exact search of 64 queries over 1M x 384 runs 254 instead of 38
# queries/s and the fast-scan shortlist 6,614 instead of 4,997 (its coarse assignment; 2 cores,
# benchmarks/index.py --data sentences, docs/retrieval.md); one query and batches of 1,000 are unchanged.
BLAS_FROM_QUERIES = 20


def search_in_batches() -> None:
    """Let FAISS use BLAS for exact distances from ``BLAS_FROM_QUERIES`` queries a call (process-wide)."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES


def _threads(cfg: BuildConfig) -> None:
    search_in_batches()
    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)


def _trained_empty(spec: IndexSpec, emb, cfg: BuildConfig):
    """The index of ``spec``, trained on a seeded sample of ``emb`` (untrained types as they are)."""

    index = faiss.index_factory(emb.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        _fast_training(index)
        rng = np.random.default_rng(cfg.seed)
        with gpu_training(index, use_gpu(cfg.device)):
            index.train(emb.take(np.sort(rng.choice(emb.n, min(emb.n, spec.train_size), replace=False))))
    return index


OPQ_NITER = 10  # FAISS's default 50 costs ~4x the training time here for little recall after re-ranking


def _fast_training(index) -> None:
    """Skip what we do not use: polysemous PQ training (an extra ~75 s at 20k x 512 on 2 cores;
    we never search in polysemous mode), and cap OPQ at ``OPQ_NITER`` iterations."""

    base = faiss.downcast_index(index.base_index) if hasattr(index, "base_index") else index
    if hasattr(base, "chain"):
        for i in range(base.chain.size()):
            transform = faiss.downcast_VectorTransform(base.chain.at(i))
            if hasattr(transform, "niter_pq"):  # an OPQMatrix
                transform.niter = OPQ_NITER
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an IVF index
        return
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False


def build(spec: IndexSpec, emb, folder: Path, cfg: BuildConfig, *, progress: bool = True):
    """Train ``spec`` once on a sample of ``emb``, then fill it with ``cfg.engine``: in RAM, or (``cfg.on_disk``)
    IVF with its inverted lists in ``folder/index.ivfdata``, for collections larger than RAM."""
    if cfg.on_disk and not spec.on_disk_ok:
        raise IndexError_(f"index type {spec.type} cannot keep its lists on disk (use ivf_flat or ivf_pq)")
    return FILL_ENGINES.get(cfg.engine).builder(spec, _trained_empty(spec, emb, cfg), emb, folder, cfg, progress)


@FILL_ENGINES.register("local", example={"extra": None})
def fill_local(spec: IndexSpec, empty, emb, folder: Path, cfg: BuildConfig, progress: bool = True):
    """This process, part by part. On disk: each part is added to its own piece (written, then freed)
    and the pieces are merged with ``faiss.contrib.ondisk.merge_ondisk``: one part's vectors in RAM at a time."""

    chunks = tqdm(emb.chunks(), total=len(emb.parts), desc=f"add ({spec.type})", unit="part", disable=not progress)
    if cfg.shards > 1:
        return shards.combine(shards.fill_shards(empty, chunks, emb.counts, cfg.shards), emb.dim)
    if not cfg.on_disk:
        index = faiss.clone_index(empty)
        for _, vectors in chunks:
            index.add(vectors)
        return index
    names = []
    for i, (start, vectors) in enumerate(chunks):
        names.append(str(folder / f"piece-{i:05d}.index"))
        faiss.write_index(make_piece(empty, vectors, start), names[-1])
    return merge_pieces(empty, names, [], folder, on_disk=True)


def make_piece(empty, vectors: np.ndarray, start: int, *, positional: bool = False):
    """A copy of the trained ``empty`` index holding ``vectors``, ids ``start ...`` where the index can
    store ids (IVF), else (or ``positional``: a shard) in order (a re-ranking index: placed by ``merge_pieces``)."""

    piece = faiss.clone_index(empty)
    if positional or _is_refine(piece):
        piece.add(vectors)
    else:
        piece.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
    return piece


def _is_refine(index) -> bool:
    return hasattr(index, "refine_index")  # faiss returns indexes as their own class


def merge_pieces(empty, names: list[str], starts: list[int], folder: Path, *, on_disk: bool):
    """One index from piece files (in id order; ``starts``: each piece's first id): IVF lists merged
    into ``folder/index.ivfdata`` (on disk), or appended in RAM. The piece files are removed."""

    index = faiss.clone_index(empty)
    if on_disk:
        merge_ondisk(index, names, str(folder / "index.ivfdata"))
    elif _is_refine(index):
        for name, start in zip(names, starts):
            piece = faiss.read_index(name)
            index.base_index.merge_from(piece.base_index, start)  # the shortlist's ids shift by the piece's start
            index.refine_index.merge_from(piece.refine_index, 0)  # the re-ranking codes are appended in id order
            index.ntotal = index.base_index.ntotal
    else:
        for name in names:
            index.merge_from(faiss.read_index(name), 0)
    for name in names:
        os.unlink(name)
    return index


@dataclass
class LoadedIndex:
    """An opened index folder: the FAISS index (search parameter set), its header and metadata."""

    folder: Path
    index: object
    header: dict
    meta: object  # pyarrow.Table, row i = id i

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


def write_index_folder(tmp: Path, index, meta, header: dict) -> None:
    """Write index.faiss (or, sharded, shard-*.faiss), meta.parquet and index.json (with the files'
    sha256) into ``tmp``."""

    if header["build_config"].get("shards", 1) > 1:
        header["shard_files"] = names = shards.write_shards(index, tmp)
    else:
        faiss.write_index(index, str(tmp / "index.faiss"))
        names = ["index.faiss"]
    pq.write_table(meta, tmp / "meta.parquet")
    files = names + ["meta.parquet"] + (["index.ivfdata"] if (tmp / "index.ivfdata").exists() else [])
    header["checksums"] = checksums.record(tmp, files)
    header["bytes"] = {f: (tmp / f).stat().st_size for f in files}
    api.files.atomic_write_text(tmp / "index.json", json.dumps(header, indent=2))


def build_index(
    embeddings: str | Path,
    out: str | Path,
    cfg: BuildConfig,
    *,
    queries: np.ndarray | None = None,
    progress: bool = True,
) -> dict:
    """Choose, train, fill and tune an index over an embedding job folder; write it atomically to ``out``."""

    _threads(cfg)
    emb = load_embeddings(embeddings)
    if emb.n == 0:
        raise IndexError_(f"{emb.folder}: no vectors to index")
    specs = candidate_specs(emb.n, emb.dim, cfg)
    try:
        qs = tuning_queries(emb, cfg.tune_on, cfg.queries, cfg.seed, queries)
    except QueryError_ as exc:
        raise IndexError_(str(exc)) from None
    with api.files.atomic_dir(out) as tmp:
        tmp = Path(tmp)
        built = [_build_tuned(tmp, emb, spec, cfg, qs, progress) for spec in specs]
        index, spec, tuning, build_s = max(built, key=lambda b: _merit(b[2]))
        header = {
            "format": FORMAT,
            "spec": spec_dict(spec),
            "knob": tuning.knob,
            "knob_value": tuning.value,
            "search_params": tuning.params,
            "recall@10": round(tuning.recall_at_10, 4),
            "recall_ntotal": int(index.ntotal),
            "recall_target": cfg.recall_target,
            "recall_margin": cfg.recall_margin,
            "recall_queries": qs.label,
            "recalls": _recalls(index, emb, cfg, qs, tuning),
            "tuning": tuning.table,
            "considered": [_summary(b) for b in built],
            "ntotal": int(index.ntotal),
            "dim": emb.dim,
            "metric": "inner_product",
            "model": emb.header["model"],
            "backend": emb.header.get("backend", "torch"),
            "model_id": emb.header["model_id"],
            "modality": emb.header["modality"],
            "embeddings": [relative_path(emb.folder, out)],  # relative to the index: the folders can move
            "parts": [p.name for p in emb.parts],
            "on_disk": cfg.on_disk,
            "build_seconds": round(sum(b[3] for b in built), 2),
            "build_config": asdict(cfg),
        }
        if not tuning.reached:
            log.warning(
                "%s reaches recall@10 %.3f, not %.2f with %g standard errors to spare, at its largest %s",
                spec.type,
                tuning.recall_at_10,
                cfg.recall_target,
                cfg.recall_margin,
                spec.knob,
            )
        write_index_folder(tmp, index, emb.meta(relative_to=out), header)
    return header


def _build_tuned(tmp: Path, emb, spec: IndexSpec, cfg: BuildConfig, qs: Queries, progress: bool):
    start = time.perf_counter()
    index = build(spec, emb, tmp, cfg, progress=progress)
    build_s = time.perf_counter() - start
    tuning = tune(index, spec, qs, cfg.recall_target, cfg.tune_seconds, cfg.recall_margin)
    return index, spec, tuning, build_s


def _recalls(index, emb, cfg: BuildConfig, qs: Queries, tuning: Tuning) -> dict:
    """recall@10 at the tuned setting by kind of query: the tuning queries', given queries held out of
    the tuning, and, when those were not items, sampled items' too (an image query's recall is not a
    text query's)."""
    out = {qs.kind: round(tuning.recall_at_10, 4)}
    if qs.held_out is not None:
        out[qs.held_out.kind] = round(qs.held_out.recall(index.search(qs.held_out.vectors, qs.held_out.k)[1]), 4)
    if qs.kind != "items":
        items = item_queries(emb, cfg.queries, cfg.seed)
        out["items"] = round(items.recall(index.search(items.vectors, items.k)[1]), 4)
    return out


def _qps_at(t: Tuning) -> float:
    key = t.knob or "exact"
    return next(
        row["qps"] for row in t.table if row[key] == t.value and all(row.get(k) == v for k, v in t.params.items())
    )


def _merit(t: Tuning) -> tuple:
    """Reaching the target first, then speed there; else recall."""
    return (t.reached, _qps_at(t) if t.reached else t.recall_at_10)


def _summary(built) -> dict:
    _, spec, t, build_s = built
    return {
        "type": spec.type,
        "knob_value": t.value,
        "recall@10": t.recall_at_10,
        "qps": _qps_at(t),
        "build_seconds": round(build_s, 2),
    }


def open_index(folder: str | Path, *, verify: bool = True) -> LoadedIndex:
    """Open an index folder, checking its format and (``verify``) every file's sha256."""

    folder = Path(folder)
    search_in_batches()
    if not (folder / "index.json").is_file():
        raise IndexError_(f"{folder}: not an index folder (no index.json)")
    try:
        header = json.loads((folder / "index.json").read_text())
    except json.JSONDecodeError as exc:
        raise IndexError_(f"{folder}/index.json is corrupt: {exc}") from None
    if header.get("format") != FORMAT:
        raise IndexError_(f"{folder}: index format {header.get('format')!r}, this version reads {FORMAT!r}; rebuild it")
    wrong = checksums.problem(folder, header.get("checksums", {}), deep=verify)
    if wrong is not None:
        raise IndexError_(wrong)
    try:
        if header.get("shard_files"):
            index = shards.read_shards(folder, header["shard_files"], header["dim"])
        else:
            index = faiss.read_index(
                str(folder / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR if header["on_disk"] else 0
            )
    except RuntimeError as exc:
        raise IndexError_(f"{folder}: an index file cannot be read: {str(exc).splitlines()[0][:200]}") from None
    for name, value in header.get("search_params", {}).items():
        set_knob(index, name, value)
    set_knob(index, header.get("knob"), header.get("knob_value"))
    return LoadedIndex(folder, index, header, pq.read_table(folder / "meta.parquet"))


def add_to_index(folder: str | Path, embeddings: str | Path, *, progress: bool = True) -> dict:
    """Append a new embedding job (same model) to an in-RAM index, written atomically. The trained
    quantizers are kept, so the recorded recall (``recall@10`` at ``recall_ntotal``) still describes
    the index while the new items resemble the old; rebuild when the collection has changed much."""

    loaded = open_index(folder)
    h = loaded.header
    if h["on_disk"] or h.get("shard_files"):
        raise IndexError_(
            f"adding to an {'on-disk' if h['on_disk'] else 'sharded'} index is not supported: rebuild it over all "
            "embedding folders"
        )
    emb = load_embeddings(embeddings)
    if emb.header["model_id"] != h["model_id"] or emb.dim != h["dim"]:
        raise IndexError_(
            f"{embeddings} was embedded by model {emb.header['model_id']} (d={emb.dim}); the index "
            f"holds model {h['model_id']} (d={h['dim']})"
        )
    here = relative_path(emb.folder, loaded.folder)
    if any((loaded.folder / e).resolve() == emb.folder.resolve() for e in h["embeddings"]):
        raise IndexError_(f"{embeddings} is already in the index")
    index = faiss.clone_index(loaded.index)
    for _, vectors in emb.chunks():
        index.add(vectors)
    meta = pa.concat_tables([loaded.meta, emb.meta(relative_to=loaded.folder)], promote_options="default")
    h = {**h, "ntotal": int(index.ntotal), "embeddings": h["embeddings"] + [here]}
    with api.files.atomic_dir(folder) as tmp:
        write_index_folder(Path(tmp), index, meta, h)
    log.info("added %d vectors to %s (now %d)", emb.n, folder, h["ntotal"])
    return h
