"""faiss-gpu where it is installed (``pip install -e '.[gpu]'``, which brings faiss-gpu-cu12 in
place of faiss-cpu) and a GPU is visible: the k-means of IVF training runs on the GPUs
(``clustering_index``, FAISS's recipe for training a CPU index on GPUs: every IVF type, OPQ and
fast-scan included), and searches run on a GPU copy of the index where FAISS has a GPU version of
its type (flat, IVF-Flat, IVF-PQ, IVF-SQ); other types search on the CPU. Indexes are always
built, tuned and saved as CPU indexes, so a folder built on a GPU machine opens anywhere.

``device``: ``auto`` (the GPU when there is one), ``cpu``, or ``cuda`` (an error without one).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import faiss

from retrieval.errors import IndexError_

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")


def gpu_count() -> int:
    """GPUs this faiss can use (0 with faiss-cpu)."""

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def use_gpu(device: str) -> bool:
    """Whether ``device`` means the GPU here; ``IndexError_`` for ``cuda`` without one."""
    if device not in DEVICES:
        raise IndexError_(f"device {device!r}: one of {', '.join(DEVICES)}")
    n = 0 if device == "cpu" else gpu_count()
    if device == "cuda" and n == 0:
        raise IndexError_(
            "device cuda: this faiss sees no GPU (faiss-cpu, or no CUDA device); install the gpu "
            "extra on a CUDA machine: pip install -e '.[gpu]'"
        )
    return n > 0


@contextlib.contextmanager
def gpu_training(index, on: bool) -> Iterator[None]:
    """While training ``index`` (a CPU index), its IVF k-means assigns on all GPUs (``on``)."""

    ivf = None
    if on:
        with contextlib.suppress(RuntimeError):  # not an IVF index: nothing to move
            ivf = faiss.extract_index_ivf(index)
    if ivf is None:
        yield
        return
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    log.info("IVF k-means on %d GPU(s)", gpu_count())
    try:
        yield
    finally:
        ivf.clustering_index = None  # frees the GPU copy; the trained centroids are in the quantizer


def to_gpu(index, on: bool):
    """A GPU copy of ``index`` (sharded over the GPUs, its search parameters kept) when ``on`` and
    FAISS has a GPU version of its type; else ``index`` itself."""

    if not on:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # each GPU holds 1/n of the vectors
    try:
        return faiss.index_cpu_to_all_gpus(index, options)
    except RuntimeError as exc:  # FAISS has no GPU version of this type (HNSW, refine, fast-scan)
        log.info("searching on the CPU: no GPU version of %s (%s)", type(index).__name__, str(exc).splitlines()[0])
        return index
