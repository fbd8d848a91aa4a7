"""Near-duplicates, one rule for the dedup job (``curate``) and the service's deduplicated answers
(``serve.engine``): a pair is two items whose cosine similarity is at or above the threshold, pairs chain
into groups (connected components, as clip-retrieval's ``get_non_uniques``), and the default threshold is
clip-retrieval's."""

from __future__ import annotations

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

NEAR_DUPLICATE = 0.94  # clip-retrieval's deduplicate threshold: the service's and `retrieval dedup`'s default


def range_pairs(flat: faiss.Index, queries: np.ndarray, threshold: float, offset: int = 0):
    """Pairs (i < j) at or above ``threshold`` between ``queries`` (rows ``offset``.. of the collection)
    and ``flat``'s vectors. FAISS's inner-product range search keeps scores strictly above its radius, so
    the radius is the float32 just below the threshold."""
    radius = np.nextafter(np.float32(threshold), np.float32(-1))
    lims, _, ids = flat.range_search(np.ascontiguousarray(queries, dtype=np.float32), float(radius))
    owner = np.repeat(np.arange(offset, offset + len(queries)), np.diff(lims).astype(np.int64))
    upper = ids > owner
    return owner[upper], ids[upper]


def components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Group label per item (N,): the connected components of the duplicate pairs."""
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def first_of_groups(labels: np.ndarray) -> np.ndarray:
    """Indices (ascending) of each group's first item."""
    return np.sort(np.unique(labels, return_index=True)[1]).astype(np.int64)
