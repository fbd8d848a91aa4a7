"""One served index: its model, FAISS index and metadata behind a micro-batcher.

Concurrent queries (texts, preprocessed images, raw vectors) are gathered into one batch: one text
encoder call for all the texts, one image encoder call for all the images, then one FAISS search per
k asked (a query asking for 1,000 hits does not make every query of its batch search for 1,000).
Queries with ``k = 0`` only embed (zero-shot labels and the uploaded image of ``/classify``).
Near-duplicate removal runs on the same worker, after the search, as connected components over
FAISS's range search (vectorised; a cap on the pairs). One query's failure (its dedup, its stored
vectors) fails that query only. Label embeddings are cached (LRU by template and label).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from mmpretrain import api
from retrieval.errors import QueryError
from retrieval.jobs.dedup import components, first_of_groups, range_pairs
from retrieval.jobs.search import Searcher
from retrieval.serve.batcher import BatchConfig, MicroBatcher

KINDS = ("text", "image", "vector")
MAX_DEDUP_PAIRS = 1_000_000


@dataclass(frozen=True)
class Query:
    """``kind``: text (a str), image (a preprocessed (3, H, W) tensor) or vector ((E,) float32, used as
    given); ``k``: hits wanted (0: embed only); ``dedup``: cosine threshold for collapsing near-duplicate
    hits (None: off)."""

    kind: str
    value: Any  # a text query may also be a list of texts (k = 0): its answer's vector is then (N, E)
    k: int = 0
    dedup: float | None = None

    @property
    def cost(self) -> int:
        """What the query weighs in the batcher's queue and batches: one per text, image or vector."""
        return len(self.value) if isinstance(self.value, list) else 1


@dataclass(frozen=True)
class Answer:
    """The query's embedding (E,), and for a search its hits' ids and scores (best first)."""

    vector: np.ndarray
    ids: np.ndarray
    scores: np.ndarray


class LabelCache:
    """LRU of label embeddings, keyed by (template, label)."""

    def __init__(self, size: int = 10_000):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
        with self._lock:
            found = {k: self._items[k] for k in keys if k in self._items}
            for k in found:
                self._items.move_to_end(k)
            return found

    def put(self, items: dict[tuple[str, str], np.ndarray]) -> None:
        with self._lock:
            self._items.update(items)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class IndexEngine:
    """A ``Searcher`` that answers a batch of ``Query``s at once (``run``); ``Engines`` batches for it."""

    def __init__(self, name: str, searcher: Searcher, *, label_cache: int = 10_000):
        self.name, self.searcher, self.model = name, searcher, searcher.model
        self.dim = int(searcher.index.header["dim"])
        self.transform = api.image_transform(self.model) if "image" in self.model.modalities else None
        self.labels = LabelCache(label_cache)

    @property
    def ntotal(self) -> int:
        return self.searcher.index.ntotal

    def check(self, query: Query) -> Query:
        if query.kind not in KINDS:
            raise QueryError(f"query kind {query.kind!r}: one of {', '.join(KINDS)}")
        if query.kind == "text" and "text" not in self.model.modalities:
            raise QueryError(f"index {self.name!r}: its model has no text tower")
        if query.kind == "image" and self.transform is None:
            raise QueryError(f"index {self.name!r}: its model has no image tower")
        return query

    def run(self, queries: list[Query]) -> list[Answer | Exception]:
        """One batch: encode per modality, search once, dedup; runs on the batcher's thread."""

        with torch.inference_mode():  # a few % faster than no_grad; every output leaves as numpy
            return self._run(queries)

    def _run(self, queries: list[Query]) -> list[Answer | Exception]:
        vectors = np.zeros((len(queries), self.dim), np.float32)
        out: list[Answer | Exception | None] = [None] * len(queries)
        lists = self._encode_texts(queries, vectors, out)
        for kind, encode in (("image", self._images), ("vector", self._vectors)):
            idx = [i for i, q in enumerate(queries) if q.kind == kind]
            if idx:
                vectors[idx] = encode([queries[i].value for i in idx])
        empty = np.zeros(0, np.int64)
        for i in range(len(queries)):
            if out[i] is None:
                out[i] = Answer(lists.get(i, vectors[i]), empty, empty.astype(np.float32))
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            if q.k > 0 and not isinstance(out[i], Exception):
                groups.setdefault(q.k, []).append(i)
        for k, todo in groups.items():
            scores, ids = self.searcher.search_vectors(vectors[todo], k)
            for row, i in enumerate(todo):
                try:
                    out[i] = self._hits(queries[i], vectors[i], ids[row], scores[row])
                except Exception as exc:  # this query's dedup or stored vectors failed: its answer only
                    out[i] = exc
        return out

    def _hits(self, query: Query, vector: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> Answer:
        keep = ids[: query.k] >= 0
        hit_ids, hit_scores = ids[: query.k][keep], scores[: query.k][keep]
        if query.dedup is not None and len(hit_ids) > 1:
            first = dedup_first(self.searcher.vectors(hit_ids), query.dedup)
            hit_ids, hit_scores = hit_ids[first], hit_scores[first]
        return Answer(vector, hit_ids, hit_scores)

    def _encode_texts(self, queries: list[Query], vectors: np.ndarray, out: list) -> dict[int, np.ndarray]:
        """All texts of the batch (single queries and label lists) in one encoder call; fills ``vectors``
        for single texts and returns the (N, E) matrices of the lists by query position."""
        spans, flat = [], []
        for i, q in enumerate(queries):
            if q.kind == "text":
                texts = q.value if isinstance(q.value, list) else [q.value]
                spans.append((i, len(flat), len(flat) + len(texts), isinstance(q.value, list)))
                flat.extend(texts)
        if not flat:
            return {}
        encoded = self._texts(flat)
        lists = {}
        for i, a, b, is_list in spans:
            if is_list:
                lists[i] = encoded[a:b]
            else:
                vectors[i] = encoded[a]
        return lists

    def _texts(self, texts: list[str]) -> np.ndarray:
        return api.encode_texts(self.model, texts).float().cpu().numpy()

    def _images(self, images: list) -> np.ndarray:
        return api.encode(self.model, "image", {"image": torch.stack(images)}).float().cpu().numpy()

    def _vectors(self, vectors: list[np.ndarray]) -> np.ndarray:
        return np.stack(vectors).astype(np.float32)


class Engines:
    """Every served index behind one ``MicroBatcher``: a batch holds the waiting queries of all indexes,
    and each index answers its share in one ``IndexEngine.run``. ``on_batch(index, size, seconds)``."""

    def __init__(
        self,
        engines: dict[str, IndexEngine],
        cfg: BatchConfig = BatchConfig(),
        *,
        on_batch=None,
        thread: bool = True,
        before_batch=None,
        after_batch=None,
    ):
        self.engines, self.on_batch = engines, on_batch
        self.batcher = MicroBatcher(
            self._run, cfg, name="queries", thread=thread, before_batch=before_batch, after_batch=after_batch
        )

    def submit(self, engine: IndexEngine, query: Query, client: str = "") -> Future:
        """Queue ``query`` for ``engine``, counted as its cost against ``client``'s share of the queue."""
        return self.batcher.submit((engine, engine.check(query)), cost=query.cost, client=client)

    def _run(self, items: list[tuple[IndexEngine, Query]]) -> list[Answer | Exception]:
        out: list = [None] * len(items)
        for engine in {id(e): e for e, _ in items}.values():
            idx = [i for i, (e, _) in enumerate(items) if e is engine]
            start = time.perf_counter()
            try:
                answers = engine.run([items[i][1] for i in idx])
            except Exception as exc:  # this index's share fails; the others still answer
                answers = [exc] * len(idx)
            for i, answer in zip(idx, answers):
                out[i] = answer
            if self.on_batch is not None:
                self.on_batch(engine.name, len(idx), time.perf_counter() - start)
        return out


def dedup_first(vectors: np.ndarray, threshold: float, *, max_pairs: int = MAX_DEDUP_PAIRS) -> np.ndarray:
    """Indices (ascending) of the rows to keep when rows whose cosine similarity is >= ``threshold``
    are near-duplicates (``retrieval.jobs.dedup``'s rule): each group keeps its first row (the best-ranked hit).

    Args:
        vectors: (N, E) the hits' stored vectors, best hit first (normalised here).
        max_pairs: the most pairs (i < j) at or over ``threshold`` worked on; more is a ``QueryError``
            (N hits make at most N(N-1)/2: 1,000 hits fit the default).
    """
    v = np.ascontiguousarray(
        vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12), dtype=np.float32
    )
    flat = faiss.IndexFlatIP(v.shape[1])
    flat.add(v)
    rows, cols = range_pairs(flat, v, threshold)
    if len(rows) > max_pairs:
        raise QueryError(f"too many near-duplicate pairs ({len(rows)}) to collapse; ask for fewer results")
    return first_of_groups(components(len(v), rows, cols))
