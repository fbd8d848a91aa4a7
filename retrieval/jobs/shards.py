"""Sharded indexes: N indexes over consecutive runs of the collection, searched together.

A sharded build (``BuildConfig.shards > 1``) fills N copies of the one trained empty index, each
with a consecutive run of embedding parts, and keeps them as ``shard-00000.faiss`` ... instead of
merging them: no merge pass, and no file larger than 1/N of the collection. Each shard stores
its items at positions 0 .. n_i - 1, and ``faiss.IndexShards`` (``successive_ids``) shifts them by
the shards before it, so shard i's position j is the collection's id ``sum(n_<i) + j``. It searches
the shards in parallel threads and merges their top-k. The search parameters (nprobe, the
shortlist factor) are set on every shard through ``faiss.ParameterSpace``. Any index type can be
sharded, since no shard needs to store ids.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np


def groups(counts: list[int], n_groups: int) -> list[list[int]]:
    """Runs of consecutive part numbers, about ``n_groups`` of them, balanced by vector count."""
    total, out, cur, acc = sum(counts), [], [], 0
    for j, c in enumerate(counts):
        cur.append(j)
        acc += c
        if acc >= total * (len(out) + 1) / n_groups and len(out) < n_groups - 1:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def fill_shards(empty, chunks, counts: list[int], n_shards: int) -> list:
    """``n_shards`` copies of the trained ``empty`` index; ``chunks`` yields (first id, (n, d) vectors)
    per part in id order, and part j goes to the shard of its run (``groups``)."""

    owner = {j: g for g, run in enumerate(groups(counts, n_shards)) for j in run}
    pieces = [faiss.clone_index(empty) for _ in range(max(owner.values()) + 1)]
    for j, (_, vectors) in enumerate(chunks):
        pieces[owner[j]].add(np.ascontiguousarray(vectors, dtype=np.float32))
    return pieces


def combine(pieces: list, d: int):
    """One searchable index over ``pieces`` (in id order), which it then owns."""

    index = faiss.IndexShards(d, True, True)  # threaded, successive ids
    for piece in pieces:
        index.add_shard(piece)
    for piece in pieces:
        piece.this.disown()  # the IndexShards frees them
    index.own_indices = True
    return index


def shard_names(n: int) -> list[str]:
    return [f"shard-{i:05d}.faiss" for i in range(n)]


def write_shards(index, folder: Path) -> list[str]:
    """Write each shard of ``index`` (an ``IndexShards``) to ``folder``; returns the file names."""

    names = shard_names(index.count())
    for i, name in enumerate(names):
        faiss.write_index(index.at(i), str(folder / name))
    return names


def read_shards(folder: Path, names: list[str], d: int):
    return combine([faiss.read_index(str(folder / name)) for name in names], d)
