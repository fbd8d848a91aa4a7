"""How an index is built (``BuildConfig``), who fills it (``FILL_ENGINES``) and what it is tuned on: the
settings the index modules share, below all of them."""

from __future__ import annotations

from dataclasses import dataclass

from mmpretrain import api
from retrieval.errors import IndexError_
from retrieval.jobs.gpu import DEVICES
from retrieval.options import RAY_ADDRESS, option, parse_bytes, show_bytes

TUNE_ON = ("auto", "captions", "items")
# name -> fn(spec, empty, emb, folder, cfg, progress) -> the filled index: how the vectors are added to the
# trained index ("local" here, "ray" in retrieval.jobs.engines). Example: the extra it needs.
FILL_ENGINES = api.Registry("index engine")
INDEX_TYPES = api.Registry("index type")  # name -> fn(n, d) -> IndexSpec; example: the recall it must reach


@dataclass(frozen=True)
class BuildConfig:
    index_type: str = option(
        "auto", help="auto, or an index type", flag="--type", choices=lambda: ["auto", *INDEX_TYPES.names()]
    )
    memory_bytes: int = option(
        4 << 30, help="RAM budget for the index", flag="--memory", parse=parse_bytes, show=show_bytes
    )
    recall_target: float = option(
        0.95, help="recall@10 vs exact search the tuned search parameter must reach", flag="--recall"
    )
    recall_margin: float = option(
        1.0,
        help="standard errors to spare: a search setting is chosen when its recall@10 over the tuning queries, "
        "less this many standard errors of that mean, reaches --recall (0: the mean alone)",
    )
    flat_below: int = 20_000  # exact search below this many vectors
    hnsw_below: int = 200_000  # HNSW graph builds are slow on CPU above this
    queries: int = option(500, help="held-out queries sampled for tuning and the recorded recall")
    tune_seconds: float = option(0.25, help="time each search setting at least this long (>= 2 runs)")
    tune_on: str = option(
        "auto",
        help="queries to tune on: captions of sampled items encoded by the job's model (text queries, as users "
        "search), sampled items, or auto: captions when the items have them",
        choices=TUNE_ON,
    )
    on_disk: bool = option(
        False, help="IVF lists on disk in index.ivfdata, built part by part and merged (larger than RAM)"
    )
    seed: int = 0
    threads: int = option(0, help="FAISS threads (0: FAISS's default)")
    engine: str = option(
        "local",
        help="who adds the vectors: local (this process) or ray (parallel tasks, pieces merged; "
        "pip install -e '.[ray]')",
        choices=lambda: FILL_ENGINES.names(),
    )
    address: str | None = option(None, help=RAY_ADDRESS)
    device: str = option(
        "auto", help="IVF training k-means on the GPUs with faiss-gpu (auto: when one is visible)", choices=DEVICES
    )
    shards: int = option(
        1,
        help="keep N shard files over consecutive parts, searched together, instead of one merged index",
        metavar="N",
    )

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
