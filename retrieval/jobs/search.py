"""Search an index with a model: text -> image (and image -> image), batched.

>>> from retrieval import Searcher
>>> s = Searcher.open("runs/index")                 # the model recorded in the index
>>> s.search("a red bicycle", k=10)[0][0].caption   # best hit of the first query
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mmpretrain import api
from retrieval.errors import QueryError
from retrieval.jobs.embed import EmbedError, load_embeddings
from retrieval.jobs.gpu import to_gpu, use_gpu
from retrieval.jobs.index import IndexError_, LoadedIndex, open_index
from retrieval.jobs.models import header_model

MAX_K = 1000


@dataclass(frozen=True)
class Hit:
    """One result: ``id`` is the row in the index; ``score`` the inner product (cosine)."""

    rank: int
    id: int
    score: float
    key: str
    caption: str
    source: str
    modality: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchLimits:
    max_k: int = 100
    max_query_chars: int = 512
    max_batch: int = 256


class Searcher:
    """A model and an index built from that model's embeddings (checked by model id and dimension)."""

    def __init__(
        self, model, index: LoadedIndex | str | Path, *, limits: SearchLimits = SearchLimits(), check_model: bool = True
    ):
        self.index = index if isinstance(index, LoadedIndex) else open_index(index)
        self.model, self.limits = model, limits
        h = self.index.header
        if model.embed_dim != h["dim"]:
            raise IndexError_(
                f"the model embeds into {model.embed_dim} dimensions, the index holds {h['dim']}: "
                f"it was built by another model ({h['model']})"
            )
        if check_model and api.model_id(model) != h["model_id"]:
            raise IndexError_(
                f"the index was built by model {h['model_id']} ({h['model']}), not by this model "
                f"({api.model_id(model)}); pass the indexing model or rebuild the index"
            )
        self._meta = {c: self.index.meta.column(c).to_pylist() for c in ("key", "caption", "source", "modality")}
        self._embeddings = None  # opened on first use of vectors()

    @classmethod
    def open(
        cls,
        index: str | Path,
        model: str | Path | None = None,
        *,
        device: str = "cpu",
        backend: str | None = None,
        verify: bool = True,
        **kwargs,
    ) -> Searcher:
        """Open ``index`` with ``model`` run by the encoding ``backend`` (default: the model and backend
        recorded in the index; ``api.list_backends()``); ``device`` ``auto``/``cuda`` searches a GPU copy
        where faiss-gpu has the index's type (``retrieval.jobs.gpu``). ``verify=False``: trust the files
        (present, not hashed), for an index too big to hash on every open of a read-only folder."""
        loaded = open_index(index, verify=verify)
        # lists on disk stay there (a GPU copy would read them all into memory); shards are searched on the CPU
        if not loaded.header["on_disk"] and not loaded.header.get("shard_files"):
            loaded.index = to_gpu(loaded.index, use_gpu(device))
        return cls(header_model(loaded.header, None if model is None else str(model), backend), loaded, **kwargs)

    def check_text(self, queries: Sequence[str]) -> list[str]:
        if not queries:
            raise QueryError("no query given")
        if len(queries) > self.limits.max_batch:
            raise QueryError(f"at most {self.limits.max_batch} queries a call, got {len(queries)}")
        out = []
        for q in queries:
            if isinstance(q, bytes):
                try:
                    q = q.decode("utf-8")
                except UnicodeDecodeError:
                    raise QueryError("query is not valid UTF-8") from None
            q = q.strip()
            if not q:
                raise QueryError("empty query")
            if len(q) > self.limits.max_query_chars:
                raise QueryError(f"query longer than {self.limits.max_query_chars} characters")
            out.append(q)
        return out

    def check_k(self, k: int) -> int:
        if not 1 <= k <= min(self.limits.max_k, MAX_K):
            raise QueryError(f"k must be between 1 and {self.limits.max_k}, got {k}")
        return min(k, self.index.ntotal)

    def search(self, query: str | Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Text -> items: one list of ``k`` hits per query (best first)."""
        queries = self.check_text([query] if isinstance(query, (str, bytes)) else list(query))
        return self.search_embeddings(api.encode_texts(self.model, queries).float().cpu().numpy(), k)

    def search_images(self, images: Sequence, k: int = 10) -> list[list[Hit]]:
        """Image -> items (PIL images or paths)."""
        return self.search_embeddings(api.encode_images(self.model, list(images)).float().cpu().numpy(), k)

    def search_embeddings(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """(Q, E) L2-normalised query vectors -> hits."""
        scores, ids = self.search_vectors(queries, self.check_k(k))
        return [
            [self._hit(r, int(i), float(s)) for r, (i, s) in enumerate(zip(row_i, row_s)) if i >= 0]
            for row_i, row_s in zip(ids, scores)
        ]

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, E) query vectors -> (scores, ids), each (Q, k), best first (-1: fewer than ``k`` items): the one
        FAISS search of the library and the service, with ``k`` already checked."""
        return self.index.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def _hit(self, rank: int, i: int, score: float) -> Hit:
        m = self._meta
        return Hit(rank, i, score, m["key"][i], m["caption"][i], m["source"][i], m["modality"][i])

    def item(self, i: int) -> dict:
        """Item ``i``'s stored metadata: key, caption, source, modality."""
        return {c: values[i] for c, values in self._meta.items()}

    def hits(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        """Hits for one query's FAISS result row (ids -1, i.e. fewer results than k, dropped)."""
        return [self._hit(r, int(i), float(s)) for r, (i, s) in enumerate(zip(ids, scores)) if i >= 0]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), E) float32 stored vectors of items ``ids``, from the embedding folders the index
        was built from (memory-mapped), else reconstructed by FAISS (approximate for PQ codes)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._embeddings is None:
            try:
                folders = self.index.header.get("embeddings", [])  # relative to the index (absolute before)
                self._embeddings = [load_embeddings(self.index.folder / f) for f in folders]
            except (EmbedError, OSError):
                self._embeddings = []
            if sum(e.n for e in self._embeddings) != self.index.ntotal:
                self._embeddings = []
        if not self._embeddings:
            return np.stack([self.index.index.reconstruct(int(i)) for i in ids]).astype(np.float32)
        out, start = np.empty((len(ids), self.index.header["dim"]), np.float32), 0
        for emb in self._embeddings:
            sel = np.nonzero((ids >= start) & (ids < start + emb.n))[0]
            if len(sel):
                out[sel] = emb.take(ids[sel] - start)
            start += emb.n
        return out

    def thumbnail(self, i: int) -> bytes:
        """The JPEG thumbnail of item ``i`` (b"" when the job stored none); ids outside the index raise."""
        if not 0 <= i < self.index.ntotal:
            raise QueryError(f"no item {i} (the index holds {self.index.ntotal})")
        row = self.index.meta.slice(i, 1).to_pylist()[0]
        if not row["thumb_len"]:
            return b""
        with open((self.index.folder / row["part"]).with_suffix(".thumbs"), "rb") as f:
            f.seek(row["thumb_offset"])
            return f.read(row["thumb_len"])

    def info(self) -> dict:
        h = self.index.header
        return {
            "ntotal": self.index.ntotal,
            "dim": h["dim"],
            "index_type": h["spec"]["type"],
            "factory": h["spec"]["factory"],
            "search_params": {**({h["knob"]: h["knob_value"]} if h.get("knob") else {}), **h.get("search_params", {})},
            "recall@10": h["recall@10"],
            "recalls": h.get("recalls", {}),  # by kind of query: captions (text), items, given
            "recall_queries": h.get("recall_queries"),
            "model": h["model"],
            "model_id": h["model_id"],
            "modality": h["modality"],
        }
