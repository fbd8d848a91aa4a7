"""How an index is built (``BuildConfig``), who fills it (``FILL_ENGINES``) and what it is tuned on: the
settings the index modules share, below all of them."""

from __future__ import annotations

from dataclasses import dataclass

from mmpretrain import api
from retrieval.errors import IndexError_
from retrieval.jobs.gpu import DEVICES

TUNE_ON = ("auto", "captions", "items")
# name -> fn(spec, empty, emb, folder, cfg, progress) -> the filled index: how the vectors are added to the
# trained index ("local" here, "ray" in retrieval.jobs.engines). Example: the extra it needs.
FILL_ENGINES = api.Registry("index engine")


@dataclass(frozen=True)
class BuildConfig:
    index_type: str = "auto"  # auto or a registered type (INDEX_TYPES: flat, hnsw, ivf_flat, ivf_rabitq_refine, ...)
    memory_bytes: int = 4 << 30  # budget for the index in RAM
    recall_target: float = 0.95  # recall@10 vs exact search the tuned search parameter must reach
    flat_below: int = 20_000  # exact search below this many vectors
    hnsw_below: int = 200_000  # HNSW graph builds are slow on CPU above this
    queries: int = 500  # held-out queries for tuning and the recorded recall
    tune_seconds: float = 0.25  # each knob setting is searched for at least this long (>= 2 runs) to time it
    tune_on: str = "auto"  # auto (captions when the items have them, as users search) | captions | items
    on_disk: bool = False  # IVF inverted lists in index.ivfdata, built part by part and merged
    seed: int = 0
    threads: int = 0  # FAISS OpenMP threads (0: FAISS's default)
    engine: str = "local"  # who adds the vectors: local (this process) | ray (parallel tasks, pieces merged)
    address: str | None = None  # ray: a running cluster ("auto", "ray://head:10001"); None starts a local one
    device: str = "auto"  # IVF training k-means on the GPUs: auto (when faiss-gpu sees one) | cpu | cuda
    shards: int = 1  # > 1: keep this many shard files, searched together (retrieval.jobs.shards), instead of merging

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise IndexError_(f"shards must be >= 1, got {self.shards}")
        if self.shards > 1 and self.on_disk:
            raise IndexError_("an on-disk index is one merged IVF: use --on-disk or --shards, not both")

        if self.engine not in FILL_ENGINES:
            raise IndexError_(f"engine {self.engine!r}: one of {', '.join(FILL_ENGINES.names())}")
        if self.tune_on not in TUNE_ON:
            raise IndexError_(f"tune_on {self.tune_on!r}: one of {', '.join(TUNE_ON)}")
        if self.device not in DEVICES:
            raise IndexError_(f"device {self.device!r}: one of {', '.join(DEVICES)}")
