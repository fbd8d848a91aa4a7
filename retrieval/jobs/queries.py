"""The queries an index is tuned and measured on, their exact neighbours, recall@k, and the tuning
itself (``sweep`` a search parameter, ``tune`` it to a recall target).

An index's search parameter is tuned to reach a recall target on held-out queries. Which queries
matters: users of an image (video, audio) collection search it with *text*, across the modality gap,
where an IVF index needs more probes than for an image query, which lands beside its own cluster.
Tuned on items alone, a knob recorded at recall 0.95 gave caption queries 0.92 (issue 28). So:

* ``captions`` (the default when the items have captions): captions of sampled items, encoded by the
  embedding job's own model (checked by model id) into text queries, as a user would ask;
* ``items``: sampled collection items, each one's own id excluded from both result lists;
* given: a (Q, E) array of real query embeddings (``--queries-file``); from 20 queries on, a seeded
  half is tuned on and the other half held out, its recall recorded beside.

The build records the recall of the tuning queries and, at the tuned setting, of sampled items too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from mmpretrain import api
from retrieval.errors import QueryError_
from retrieval.jobs.index_types import IndexSpec
from retrieval.jobs.models import header_model

log = logging.getLogger(__name__)

HELD_OUT_MIN = 20  # given queries from which half are held out of the tuning


@dataclass
class Queries:
    """Held-out queries: vectors, exact top-10 ids, ids to exclude (items: each query's own), and what they are."""

    vectors: np.ndarray
    truth: np.ndarray
    exclude: np.ndarray | None
    kind: str  # "captions" | "items" | "given" | "given_held_out"
    label: str  # what index.json says they were
    held_out: Queries | None = None  # disjoint queries of the same kind, not tuned on (recall reported)

    def recall(self, found: np.ndarray) -> float:
        return recall_at_k(drop(found, self.exclude), self.truth, 10)

    def hits(self, found: np.ndarray) -> np.ndarray:
        """Each query's recall@10 (its mean is ``recall``)."""
        return hits_at_k(drop(found, self.exclude), self.truth, 10)

    @property
    def k(self) -> int:
        """Hits to ask the index for (one more where a query's own id is dropped)."""
        return self.truth.shape[1] + (self.exclude is not None)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) ids of the exact top-k by inner product (FAISS brute force, no copy of ``vectors``)."""

    return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def hits_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> np.ndarray:
    """|found[i, :k] & truth[i, :k]| / k for each query i."""
    return np.array([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)])


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean |found[:, :k] & truth[:, :k]| / k."""
    hits = hits_at_k(found, truth, k)
    return float(hits.mean()) if len(hits) else 1.0


def drop(found: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """Remove ``exclude[i]`` from row i (keeping k = width - 1 columns)."""
    if exclude is None:
        return found
    return np.stack([[x for x in row if x != e][: found.shape[1] - 1] for row, e in zip(found, exclude)])


def item_queries(emb, count: int, seed: int) -> Queries:
    """``count`` sampled items; each one's own id is excluded from the exact and the approximate results."""
    rng = np.random.default_rng(seed + 1)
    ids = np.sort(rng.choice(emb.n, min(emb.n, count), replace=False))
    q = emb.take(ids)
    truth = drop(exact(emb, q, 11), ids)
    return Queries(q, truth, ids, "items", f"{len(ids)} sampled items (self excluded)")


def given_queries(emb, vectors: np.ndarray, seed: int = 0) -> Queries:
    """Given query vectors: from ``HELD_OUT_MIN`` on, a seeded half is tuned on and the other half held
    out (its recall at the tuned setting is recorded too: a recall tuned and reported on the same
    queries flatters the setting)."""
    q = np.ascontiguousarray(vectors, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != emb.dim:
        raise QueryError_(f"the given queries are {q.shape}; the embeddings are (N, {emb.dim})")
    if len(q) < HELD_OUT_MIN:
        return Queries(q, exact(emb, q, 10), None, "given", f"{len(q)} given queries")
    order = np.random.default_rng(seed + 3).permutation(len(q))
    tune_q, report_q = q[np.sort(order[: len(q) // 2])], q[np.sort(order[len(q) // 2 :])]
    held = Queries(report_q, exact(emb, report_q, 10), None, "given_held_out", f"{len(report_q)} given, held out")
    label = f"{len(tune_q)} of {len(q)} given queries (the other {len(report_q)} held out)"
    return Queries(tune_q, exact(emb, tune_q, 10), None, "given", label, held_out=held)


def sample_captions(emb, count: int, seed: int) -> list[str]:
    """Up to ``count`` distinct non-empty captions of items, in a seeded random order."""
    meta = emb.meta()
    captions = [] if meta is None or "caption" not in meta.column_names else meta.column("caption").to_pylist()
    distinct = sorted({c.strip() for c in captions if c and c.strip()})
    rng = np.random.default_rng(seed + 2)
    return [distinct[i] for i in rng.permutation(len(distinct))[:count]]


def caption_queries(emb, texts: list[str], model=None) -> Queries:
    """``texts`` (captions of sampled items) encoded by the job's model (``model``: already loaded) as
    text queries."""
    if not texts:
        raise QueryError_(f"{emb.folder}: the items have no captions to tune on")
    if model is None:
        model = header_model(emb.header)
    if api.model_id(model) != emb.header["model_id"]:
        raise QueryError_(
            f"{emb.header['model']} is now model {api.model_id(model)}, not {emb.header['model_id']} that embedded "
            f"{emb.folder}: its captions would be other queries"
        )

    with torch.inference_mode():
        q = api.encode_texts(model, texts).float().numpy()
    return Queries(q, exact(emb, q, 10), None, "captions", f"{len(texts)} captions (text queries)")


def tuning_queries(emb, tune_on: str, count: int, seed: int, given: np.ndarray | None = None) -> Queries:
    """The queries to tune on: ``given`` if any; else captions (``auto``: when the items are not text and
    have captions, and the job's model loads) or sampled items."""
    if given is not None:
        return given_queries(emb, given, seed)
    if tune_on == "items" or (tune_on == "auto" and emb.header.get("modality") == "text"):
        return item_queries(emb, count, seed)
    texts = sample_captions(emb, count, seed)
    if tune_on == "auto" and not texts:
        log.info("tuning on sampled items: %s has no captions", emb.folder)
        return item_queries(emb, count, seed)
    try:
        return caption_queries(emb, texts)
    except (QueryError_, OSError, ValueError, KeyError) as exc:
        if tune_on == "captions":
            raise QueryError_(f"cannot tune on captions: {exc}") from None
        log.warning("tuning on sampled items, not captions: %s", exc)
        return item_queries(emb, count, seed)


def exact(emb, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k over the whole collection (in memory up to 2M vectors; else part by part)."""
    if emb.n <= 2_000_000:
        return exact_neighbours(emb.array(), q, k)

    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    for start, part in emb.chunks():
        sim = q @ part.T
        kk = min(k, sim.shape[1])
        top = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        heap.add_result(np.ascontiguousarray(np.take_along_axis(sim, top, 1)), np.ascontiguousarray(top + start))
    heap.finalize()
    return heap.I


@dataclass
class Tuning:
    knob: str | None
    value: int | None
    recall_at_10: float
    table: list[dict] = field(default_factory=list)  # per setting and knob value: recall@10 (and its standard
    #                                                  error over the queries), queries/s
    params: dict = field(default_factory=dict)  # the chosen setting of the other search parameters
    reached: bool = True  # whether the chosen setting reaches the target (``reaches``)


MEASURES = ("recall@10", "recall_se", "qps")  # what a tuning row measured; its other keys are the setting


def setting_of(row: dict) -> dict:
    """A tuning row's setting: the knob and the other search parameters, without what was measured."""
    return {k: v for k, v in row.items() if k not in MEASURES}


def reaches(row: dict, target: float, margin: float) -> bool:
    """Whether a setting's recall@10 reaches ``target`` with ``margin`` standard errors to spare: the mean
    over the tuning queries is an estimate, and a setting chosen at the edge of the target gives other
    queries less about half of the time (BuildConfig.recall_margin)."""
    return row["recall@10"] - margin * row.get("recall_se", 0.0) >= target


def set_knob(index, knob: str | None, value: int | None) -> None:
    if knob is not None and value is not None:
        faiss.ParameterSpace().set_index_parameter(index, knob, value)


def sweep(
    index, spec: IndexSpec, qs: Queries, stop_at: float | None = None, min_seconds: float = 0.25, margin: float = 0.0
) -> list[dict]:
    """recall@10 of ``qs`` (with its standard error over the queries) and queries/s for each setting of
    ``spec.param_grid`` and each knob value in order. Along the knob, a setting stops once it
    ``reaches`` ``stop_at`` (with ``margin``) or recall has stopped rising for two steps (PQ plateaus)."""
    table = []
    for setting in spec.param_grid:
        for name, value in setting:
            set_knob(index, name, value)
        flat_steps, last = 0, -1.0
        for value in spec.knob_values or (None,):
            set_knob(index, spec.knob, value)
            found, qps = timed_search(index, qs.vectors, qs.k, min_seconds)
            hits = qs.hits(found)
            r, se = float(hits.mean()), float(hits.std(ddof=1) / np.sqrt(len(hits))) if len(hits) > 1 else 0.0
            row = {spec.knob or "exact": value, **dict(setting), "recall@10": round(r, 4), "recall_se": round(se, 4)}
            table.append({**row, "qps": round(qps, 1)})
            flat_steps = flat_steps + 1 if r <= last + 1e-3 else 0
            last = max(last, r)
            if (stop_at is not None and reaches(row, stop_at, margin)) or flat_steps >= 2:
                break
    return table


def tune(index, spec: IndexSpec, qs: Queries, target: float, min_seconds: float = 0.25, margin: float = 0.0) -> Tuning:
    """The fastest setting that ``reaches`` ``target`` with ``margin`` standard errors to spare (else the most
    accurate), set on ``index``."""
    table = sweep(index, spec, qs, stop_at=target, min_seconds=min_seconds, margin=margin)
    reached = [row for row in table if reaches(row, target, margin)]
    best = max(reached, key=lambda row: row["qps"]) if reached else max(table, key=lambda row: row["recall@10"])
    params = {k: v for k, v in setting_of(best).items() if k != (spec.knob or "exact")}
    for name, value in params.items():
        set_knob(index, name, value)
    set_knob(index, spec.knob, best.get(spec.knob or "exact"))
    return Tuning(spec.knob, best.get(spec.knob or "exact"), best["recall@10"], table, params, bool(reached))


def timed_search(index, queries: np.ndarray, k: int, min_seconds: float = 0.25) -> tuple[np.ndarray, float]:
    """Search the batch; queries/s from the fastest of repeated runs (at least 2, >= ``min_seconds``)."""
    best, total, reps = float("inf"), 0.0, 0
    while reps < 2 or (total < min_seconds and reps < 20):
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        took = time.perf_counter() - start
        best, total, reps = min(best, took), total + took, reps + 1
    return ids, len(queries) / max(best, 1e-9)
