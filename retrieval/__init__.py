"""Retrieval layer: embedding jobs, FAISS indexes, search, and the search service.

Uses only ``mmpretrain.api`` (and ``mmpretrain.types``), never mmpretrain's internals.

    >>> from retrieval import Searcher
    >>> hits = Searcher.open("runs/index").search("a red bicycle", k=10)[0]
"""

import retrieval._openmp  # noqa: F401  (first: OpenMP's wait policy, before torch and FAISS load it)
import retrieval.jobs  # noqa: F401  (the dedup keep rules and the Ray engines register on import)
from retrieval.jobs.embed import EmbedConfig, Embeddings, load_embeddings, run_embed
from retrieval.jobs.index import (
    INDEX_TYPES,
    BuildConfig,
    IndexSpec,
    add_to_index,
    build_index,
    choose_index,
    open_index,
)
from retrieval.jobs.search import Hit, QueryError, Searcher, SearchLimits

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
