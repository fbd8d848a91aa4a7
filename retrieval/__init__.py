"""Retrieval layer: embedding jobs, FAISS indexes, search, and the search service.

Uses only ``mmpretrain.api`` (and ``mmpretrain.types``), never mmpretrain's internals.

    >>> from retrieval import Searcher
    >>> hits = Searcher.open("runs/index").search("a red bicycle", k=10)[0]
"""

from retrieval import (
    curate,  # noqa: F401,E402  (registers the dedup keep rules)
    ray_engine,  # noqa: F401,E402  (registers the "ray" engines; Ray is imported only when used)
)
from retrieval.embed import EmbedConfig, Embeddings, load_embeddings, run_embed
from retrieval.index import INDEX_TYPES, BuildConfig, IndexSpec, add_to_index, build_index, choose_index, open_index
from retrieval.search import Hit, QueryError, Searcher, SearchLimits

__all__ = [
    "INDEX_TYPES",
    "BuildConfig",
    "EmbedConfig",
    "Embeddings",
    "Hit",
    "IndexSpec",
    "QueryError",
    "SearchLimits",
    "Searcher",
    "add_to_index",
    "build_index",
    "choose_index",
    "load_embeddings",
    "open_index",
    "run_embed",
]
