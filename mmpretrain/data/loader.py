"""A resumable training loader over webdataset shards, tracking what was *consumed*."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from multiprocessing.util import Finalize
from typing import Any

import torch
from torch.utils.data import DataLoader
from webdataset.shardlists import expand_urls

from mmpretrain.config.schema import DataConfig
from mmpretrain.config.strict import ConfigError
from mmpretrain.data.ops import OpContext, build_ops
from mmpretrain.data.stream import (
    DataError,
    Position,
    ReadLimits,
    ShardStream,
    StreamSpec,
    WorkerBatch,
    WorkerStatus,
    derive_seed,
)
from mmpretrain.utils.procs import kill_tree

log = logging.getLogger(__name__)


def expand_shards(spec: str, where: str = "data.train", problems: list[str] | None = None) -> list[str]:
    """Expand a shard spec: brace patterns, ``::``-joined lists, ``pipe:``/``s3://`` URLs; a directory
    expands to its ``*.tar``.

    Local paths are checked up front, naming ``where`` and each pattern (``::`` part) with missing
    files: when no local path exists at all, a typo, it is a ``ConfigError`` (before any work);
    otherwise each such pattern is reported (appended to ``problems`` when given, else logged) and its
    missing shards are skipped and counted when read.
    """
    if not spec:
        raise ConfigError(f"{where} is empty: give shard paths, e.g. data/shards/shard-{{000000..000009}}.tar")
    urls: list[str] = []
    notes: list[str] = []
    local = missing = 0
    for part in spec.split("::"):
        found = _expand_part(part)
        paths = [u for u in found if "://" not in u and not u.startswith("pipe:")]
        absent = [u for u in paths if not os.path.exists(u)]
        local, missing = local + len(paths), missing + len(absent)
        if absent:
            what = (
                "matches no file" if len(absent) == len(paths) else f"misses {len(absent)} of its {len(paths)} shards"
            )
            notes.append(f"{where}: {part!r} {what} ({len(paths)} local shard path(s), first missing: {absent[0]!r})")
        urls.extend(found)
    if local and missing == local:
        raise ConfigError(f"{notes[0]}; check the path or brace pattern")
    for note in notes:  # some shards exist: the missing ones are skipped and counted when read
        if problems is None:
            log.warning("%s; those shards will be skipped and counted", note)
        else:
            problems.append(note)
    if not urls:
        raise ConfigError(f"{where}: {spec!r} expands to no shards (an empty folder?)")
    return urls


def _expand_part(part: str) -> list[str]:
    out: list[str] = []
    for url in expand_urls(part):
        if os.path.isdir(url):
            out.extend(sorted(os.path.join(url, f) for f in os.listdir(url) if f.endswith(".tar")))
        else:
            out.append(url)
    return out


def check_shards(cfg: DataConfig) -> list[str]:
    """The shards ``data.train`` or a mixture's sources name, checked before any work (``train``,
    ``mmpretrain config``): a pattern that matches no file raises ``ConfigError``; returns the
    reports of patterns with some files missing (not logged here: the loader logs them once)."""
    problems: list[str] = []
    for j, src in enumerate(cfg.sources):
        expand_shards(src.train, f"data.sources[{j}].train", problems)
    if not cfg.sources:
        expand_shards(cfg.train, "data.train", problems)
    return problems


class ResumableLoader:
    """Iterates ``WorkerBatch``es forever and knows how to continue exactly where it stopped.

    ``state_dict()`` holds, per logical worker, the position after the last batch the
    training loop *consumed* (prefetched batches do not count), and the worker rotation.
    """

    def __init__(
        self,
        cfg: DataConfig,
        ctx: OpContext,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        state: dict[str, Any] | None = None,
        ops_where: str = "data.ops",
    ):
        urls = expand_shards(cfg.train)
        workers = cfg.num_workers
        if not cfg.resampled and len(urls) < world_size * max(1, workers):
            raise ConfigError(
                f"data.train has {len(urls)} shard(s), fewer than ranks x workers = "
                f"{world_size} x {max(1, workers)}: lower data.num_workers, write more shards, "
                "or set data.resampled=true"
            )
        limits = ReadLimits(cfg.max_member_bytes, cfg.stall_timeout_s)
        self.spec = StreamSpec(
            tuple(urls),
            cfg.batch_size,
            seed,
            rank,
            world_size,
            cfg.shuffle_buffer,
            cfg.shuffle_shards,
            cfg.resampled,
            cfg.on_error,
            cfg.max_errors,
            limits,
        )
        self.num_workers, self.cfg = workers, cfg
        self.positions, self.rotation = self._load_state(state, world_size)
        self.consumed = 0
        self.status = WorkerStatus(workers)
        atexit.register(self.status.close)  # runs before multiprocessing terminates daemonic workers at exit
        ops = build_ops(cfg.ops, ctx, ops_where)
        stream = ShardStream(self.spec, ops, start=self.positions, rotation=self.rotation, status=self.status)
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=partial(_worker_init, status=self.status),
            prefetch_factor=cfg.prefetch_factor if workers else None,
            persistent_workers=workers > 0,
            timeout=cfg.timeout_s if workers else 0,
        )

    def _load_state(self, state: dict[str, Any] | None, world_size: int) -> tuple[dict[int, Position], int]:
        if not state:
            return {}, 0
        saved = (state["num_workers"], state["world_size"])
        if saved != (self.num_workers, world_size):
            raise DataError(
                f"cannot resume the data stream exactly: it was saved with data.num_workers="
                f"{saved[0]} on {saved[1]} rank(s), now {self.num_workers} on {world_size}"
            )
        positions = {int(w): Position(**p) for w, p in state["positions"].items()}
        return positions, int(state["rotation"])

    def __iter__(self) -> Iterator[WorkerBatch]:
        batches = iter(self.loader)
        try:
            yield from self._batches(batches)
        finally:
            self.status.close()  # the workers' SIGTERM from here on is the DataLoader shutting them down

    def _batches(self, batches: Iterator[WorkerBatch]) -> Iterator[WorkerBatch]:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as exc:
                if "timed out" not in str(exc):  # torch says only "DataLoader timed out after N seconds"
                    raise
                raise DataError(
                    f"rank {self.spec.rank}: no batch from the data loader workers for "
                    f"{self.cfg.timeout_s:g} s (data.timeout_s); {self.status.describe()}. Fix or "
                    f"drop that shard, then resume with train.resume=latest"
                ) from None
            self.positions[batch.worker] = batch.position
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        nw = max(1, self.num_workers)
        return {
            "num_workers": self.num_workers,
            "world_size": self.spec.world_size,
            "rotation": (self.rotation + self.consumed) % nw,
            "positions": {str(w): p.to_dict() for w, p in self.positions.items()},
        }

    def error_counts(self) -> dict[str, int]:
        """Skipped samples/shards by kind, summed over this rank's workers."""
        total: dict[str, int] = {}
        for pos in self.positions.values():
            for kind, n in pos.errors.items():
                total[kind] = total.get(kind, 0) + n
        return total


class MixedLoader:
    """Several sources (``data.sources``), one per optimizer step, drawn by weight.

    The draw for step ``n`` depends only on (seed, n), so every rank takes the same source at the
    same step (their collectives and loss pairs match) and a resumed run continues the sequence.
    Each source is its own ``ResumableLoader`` (own ops, workers, position); ``group`` batches in a
    row (``train.accum_steps``) come from one source, so accumulated micro-batches share modalities.
    """

    def __init__(
        self,
        cfg: DataConfig,
        ctx: OpContext,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        state: dict[str, Any] | None = None,
        group: int = 1,
    ):
        self.seed, self.group = seed, group
        self.weights = [src.weight for src in cfg.sources]
        saved = (state or {}).get("sources") or [None] * len(cfg.sources)
        if len(saved) != len(cfg.sources):
            raise DataError(
                f"cannot resume: the checkpoint has {len(saved)} data sources, the config {len(cfg.sources)}"
            )
        self.loaders = [
            ResumableLoader(
                dataclasses.replace(cfg, train=src.train, ops=src.ops or cfg.ops, sources=[]),
                ctx,
                seed=seed + 7919 * i,
                rank=rank,
                world_size=world_size,
                state=saved[i],
                ops_where=f"data.sources[{i}].ops" if src.ops else "data.ops",
            )
            for i, src in enumerate(cfg.sources)
        ]
        self.consumed = int((state or {}).get("consumed", 0))

    def source_of(self, batch_index: int) -> int:
        """The source of the ``batch_index``-th batch (same on every rank)."""

        rng = random.Random(derive_seed(self.seed, "mix", batch_index // self.group))
        return rng.choices(range(len(self.weights)), weights=self.weights)[0]

    def __iter__(self) -> Iterator[WorkerBatch]:
        iters: dict[int, Iterator[WorkerBatch]] = {}  # started on first use: a source never drawn costs nothing
        while True:
            k = self.source_of(self.consumed)
            if k not in iters:
                iters[k] = iter(self.loaders[k])
            batch = next(iters[k])
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "sources": [loader.state_dict() for loader in self.loaders]}

    def error_counts(self) -> dict[str, int]:
        """Skipped samples/shards by kind, summed over the sources."""

        return dict(sum((Counter(loader.error_counts()) for loader in self.loaders), Counter()))


def restart_state(saved: list[dict[str, Any]], cfg: DataConfig, world_size: int) -> dict[str, Any]:
    """A data state (the same on every rank) that starts every stream at the beginning of the epoch
    after the furthest one in ``saved`` (all ranks' saved states): for a resume whose allowed config
    change (shards, seed, workers, ranks) makes the saved positions meaningless. No sample of that
    epoch is repeated; the rest of the interrupted epoch is not seen again."""
    epoch = 1 + max(_epochs(saved), default=-1)
    workers = max(1, cfg.num_workers)

    def fresh() -> dict[str, Any]:
        return {
            "num_workers": cfg.num_workers,
            "world_size": world_size,
            "rotation": 0,
            "positions": {str(w): Position(epoch=epoch).to_dict() for w in range(workers)},
        }

    if cfg.sources:
        consumed = max((int(s.get("consumed", 0)) for s in saved), default=0)
        return {"consumed": consumed, "sources": [fresh() for _ in cfg.sources]}
    return fresh()


def _epochs(node: Any) -> Iterator[int]:
    """Every stream position's epoch inside a (nested) saved data state."""
    if isinstance(node, list):
        for item in node:
            yield from _epochs(item)
    elif isinstance(node, dict):
        if "positions" in node:
            yield from (int(p["epoch"]) for p in node["positions"].values())
        for item in node.get("sources", []) or []:
            yield from _epochs(item)


def build_loader(
    cfg: DataConfig,
    ctx: OpContext,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    state: dict[str, Any] | None = None,
    group: int = 1,
) -> ResumableLoader | MixedLoader:
    """A ``MixedLoader`` when ``cfg.sources`` is set, else a ``ResumableLoader`` over ``cfg.train``."""
    if cfg.sources:
        return MixedLoader(cfg, ctx, seed=seed, rank=rank, world_size=world_size, state=state, group=group)
    return ResumableLoader(cfg, ctx, seed=seed, rank=rank, world_size=world_size, state=state)


WORKER_TERM_GRACE_S = 20.0


def _worker_init(_: int, status: WorkerStatus | None = None) -> None:
    torch.set_num_threads(1)  # workers decode; compute threads belong to the main process
    signal.signal(signal.SIGTERM, partial(_worker_sigterm, status))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the group: the main process decides
    # a pipe: shard's command still running when the worker ends would outlive it (and hold its stdout)
    Finalize(None, kill_tree, args=(os.getpid(),), kwargs={"keep_root": True}, exitpriority=10)


def _worker_sigterm(status: WorkerStatus | None, signum: int, frame: Any) -> None:
    """A preemption's SIGTERM often reaches the whole process group: a worker that died of it at once
    would take the run down before the main process could finish its step and checkpoint. So a
    worker leaves at once only when the main process is closing the loader (``status.closing``,
    then the SIGTERM is the DataLoader's own terminate()), else when its parent has gone or
    ``WORKER_TERM_GRACE_S`` later."""

    def leave() -> None:
        kill_tree(os.getpid(), keep_root=True)  # pipe: commands it started
        os._exit(0)

    if status is None or status.closing.value:
        leave()
    parent, deadline = os.getppid(), time.monotonic() + WORKER_TERM_GRACE_S

    def leave_later() -> None:
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.2)
        leave()

    threading.Thread(target=leave_later, daemon=True, name="sigterm-grace").start()
