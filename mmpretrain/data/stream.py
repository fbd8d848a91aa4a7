"""A deterministic, resumable webdataset stream, batched inside each loader worker.

Each (rank, logical worker) stream is a pure function of (seed, epoch):
    shards of epoch e  = shuffle(all shards, seed, e)[rank::world][worker::workers]
                         (or drawn with replacement when ``resampled``)
    raw samples        = webdataset's url_opener -> our bounded tar reader -> webdataset's group_by_keys
    order              = a seeded shuffle buffer, drained at the end of each epoch
    augmentation       = torch RNG seeded per sample from (seed, epoch, rank, worker, index)
A stream's position is ``(epoch, emitted)``: samples that left the shuffle buffer this
epoch. Resuming replays the epoch's raw tar bytes *without decoding* and skips that many,
so the batches that follow are identical to an uninterrupted run. Streams loop over
epochs forever; training length is set in steps.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import multiprocessing
import random
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, url_opener

from mmpretrain.data.ops import RAGGED_KEYS, Op, Sample, SampleError, apply_ops
from mmpretrain.errors import DataError
from mmpretrain.utils.procs import kill_tree

log = logging.getLogger(__name__)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any hashable parts (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Position:
    """Where one logical worker's stream stands: ``emitted`` samples out of epoch ``epoch``."""

    epoch: int = 0
    emitted: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    shard: str = ""  # the shard of the last sample, for humans

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "emitted": self.emitted, "errors": dict(self.errors), "shard": self.shard}


@dataclass
class WorkerBatch:
    """A collated batch and where it came from.

    ``data``: ``{"image": (B, 3, H, W), "text": (B, L), "text_mask": (B, L) True = keep}``.
    """

    data: dict[str, torch.Tensor]
    keys: list[str]
    worker: int
    position: Position

    def pin_memory(self) -> WorkerBatch:
        self.data = {k: v.pin_memory() for k, v in self.data.items()}
        return self


class ErrorCounter:
    """Counts skipped samples/shards by kind; raises when configured to or over the limit."""

    def __init__(self, on_error: str, max_errors: int | None, counts: dict[str, int] | None = None):
        self.on_error, self.max_errors = on_error, max_errors
        self.counts: dict[str, int] = dict(counts or {})
        self.muted = False  # while replaying to a resume point (those errors were counted before)

    def record(self, kind: str, exc: BaseException) -> None:
        if self.muted:
            return
        if self.on_error == "raise":
            raise DataError(f"{kind}: {exc} (data.on_error=raise)") from exc
        self.counts[kind] = self.counts.get(kind, 0) + 1
        total = sum(n for k, n in self.counts.items() if not k.startswith("absent_"))
        if total <= 10 or total % 100 == 0:
            log.warning("skipped %s (%d skipped so far): %s", kind, total, exc)
        if self.max_errors is not None and total > self.max_errors:
            raise DataError(f"more than data.max_errors={self.max_errors} bad samples/shards: {self.counts}")

    def note(self, kind: str) -> None:
        """Count something that is not an error (an absent optional modality): never raises."""
        if not self.muted:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def handler(self, exc: BaseException) -> bool:
        """A webdataset exception handler: record and continue."""
        self.record(_classify(exc), exc)
        return True


def _classify(exc: BaseException) -> str:
    if isinstance(exc, SampleError):
        return exc.kind
    if isinstance(exc, FileNotFoundError):
        return "missing_shard"
    if isinstance(exc, (tarfile.TarError, EOFError)):
        return "corrupt_shard"
    return "read_error"


SHARD_ERRORS = ("missing_shard", "corrupt_shard", "read_error", "stalled_shard")  # a source not read to its end


MAX_TAR_HEADER_BYTES = 64 << 10  # a pax or GNU long-name header larger than this ends the shard (corrupt_shard)


class _CappedTarInfo(tarfile.TarInfo):
    """``tarfile`` reads a pax or GNU long-name header's payload whole, whatever size it declares (a
    shard could claim gigabytes): here it is capped, and sparse members (never in a webdataset shard,
    and read entry by entry) are refused."""

    def _proc_gnulong(self, tarfile_):
        _check_header_size(self)
        return super()._proc_gnulong(tarfile_)

    def _proc_pax(self, tarfile_):
        _check_header_size(self)
        return super()._proc_pax(tarfile_)

    def _proc_sparse(self, tarfile_):
        raise tarfile.ReadError(f"sparse member {self.name[:200]!r}: not read")


def _check_header_size(info: tarfile.TarInfo) -> None:
    if info.size > MAX_TAR_HEADER_BYTES:
        raise tarfile.ReadError(f"a {info.size}-byte extended header (at most {MAX_TAR_HEADER_BYTES})")


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what one shard may make a reader do."""

    max_member_bytes: int = 32 << 20  # larger members are skipped (oversized_member), never read into memory
    stall_timeout_s: float = 120.0  # a pipe: shard silent this long has its command killed (stalled_shard); 0: off


class _TailReader:
    """Wraps a shard's byte stream: remembers the byte count and the last block read, and, for a
    ``pipe:`` shard, kills the command if one read waits longer than ``stall_s`` (a hung download)."""

    def __init__(self, raw: Any, url: str, stall_s: float):
        self.raw, self.url, self.total, self.tail = raw, url, 0, b""
        self.stall_s, self.stalled, self._reading_since = stall_s, False, None
        self._closed = threading.Event()
        proc = getattr(raw, "proc", None)  # webdataset's Pipe
        if proc is not None and stall_s > 0:
            threading.Thread(target=self._watchdog, args=(proc,), daemon=True, name="shard-watchdog").start()

    def _watchdog(self, proc: Any) -> None:
        while not self._closed.wait(min(1.0, self.stall_s / 4)):
            since = self._reading_since
            if since is not None and time.monotonic() - since > self.stall_s:
                self.stalled = True
                kill_tree(proc.pid)  # the shell and what it started: a surviving child keeps the pipe open
                return

    def read(self, n: int = -1) -> bytes:
        self._reading_since = time.monotonic()
        try:
            data = self.raw.read(n)
        except Exception:
            if not self.stalled:
                raise
            data = b""
        finally:
            self._reading_since = None
        if self.stalled:
            raise SampleError(
                "stalled_shard",
                f"{self.url}: no bytes for {self.stall_s:g} s (data.stall_timeout_s); its command was killed",
            )
        self.total += len(data)
        self.tail = (self.tail + data[-512:])[-512:]
        return data

    def complete(self) -> bool:
        """True if the stream ended with tar's end-of-archive zero block at a block boundary."""
        while self.read(1 << 16):
            pass
        return self.total > 0 and self.total % 512 == 0 and self.tail == bytes(512)

    def close(self) -> None:
        self._closed.set()
        try:
            self.raw.close()
        except Exception as exc:  # a killed or failed pipe command reports its exit status here
            log.debug("closing %s: %s", self.url, exc)


def _member_problem(info: tarfile.TarInfo, url: str, limits: ReadLimits) -> SampleError | None:
    """Why a regular tar member must be skipped (an unsafe name, too large), or None."""
    parts = PurePosixPath(info.name).parts
    if info.name.startswith(("/", "\\")) or ".." in parts or "\\" in info.name:
        return SampleError("unsafe_name", f"{url}: member name {info.name[:200]!r} (absolute or with ..)")
    if info.size > limits.max_member_bytes:
        return SampleError(
            "oversized_member",
            f"{url}: member {info.name[:200]!r} has {info.size} bytes, over "
            f"data.max_member_bytes={limits.max_member_bytes}",
        )
    return None


def _shard_members(source: dict, handler: Callable[[BaseException], bool], limits: ReadLimits) -> Iterator[dict]:
    """``{"fname", "data", "__url__"}`` for each regular member of one opened shard, then ``{}`` (the
    end-of-shard marker ``group_by_keys`` expects). Unsafe and oversized members are skipped without
    being read; a truncated, corrupt or stalled shard goes to ``handler`` once (``tarfile`` in stream
    mode stops silently at a truncated header, hence the end-of-archive check)."""
    url = source["url"]
    reader = _TailReader(source["stream"], url, limits.stall_timeout_s)
    try:
        tar = tarfile.open(fileobj=reader, mode="r|", tarinfo=_CappedTarInfo)  # raw tar: no decompression bombs
        for info in tar:
            if not info.isreg() or PurePosixPath(info.name).name.startswith("__"):
                continue
            problem = _member_problem(info, url, limits)
            if problem is not None:
                handler(problem)
                continue
            yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []
        if not reader.complete():
            raise tarfile.ReadError(f"{url}: truncated tar (no end-of-archive marker)")
    except DataError:  # data.on_error=raise
        raise
    except Exception as exc:  # tarfile, the pipe, the watchdog: the rest of this shard is lost
        if not isinstance(exc, SampleError):
            exc = SampleError(_classify(exc), f"{url}: {exc}")
        handler(exc)
    finally:
        reader.close()
    yield {}


def read_samples(
    urls: list[str],
    handler: Callable[[BaseException], bool],
    limits: ReadLimits = ReadLimits(),
    on_shard: Callable[[str], None] | None = None,
) -> Iterator[Sample]:
    """Raw samples (``{"__key__", "__url__", ext: bytes}``) from tar shards, in order.

    Missing, unreadable, truncated and stalled shards, and unsafe or oversized members, go to
    ``handler`` (skip-and-count or raise). ``on_shard(url)`` is called as each shard is opened."""

    def members() -> Iterator[dict]:
        for source in url_opener(({"url": u} for u in urls), handler=handler):
            if on_shard is not None:
                on_shard(source["url"])
            yield from _shard_members(source, handler, limits)

    return group_by_keys(members(), handler=handler)


def process_sample(ops: list[Op], sample: Sample, errors: ErrorCounter) -> Sample | None:
    """``ops`` applied to ``sample``, or None when they fail: any exception (a ``SampleError``, or the
    ``RecursionError`` of a hostile JSON, a codec's crash, ...) is a counted skip naming the shard
    and key (or a ``DataError`` under ``data.on_error=raise``), never the end of a run."""
    try:
        return apply_ops(ops, sample)
    except SampleError as exc:
        errors.record(exc.kind, SampleError(exc.kind, f"{out_url(sample)}: {exc}"))
    except Exception as exc:
        errors.record(
            "op_error",
            SampleError(
                "op_error", f"{out_url(sample)}#{sample.get('__key__')}: {type(exc).__name__}: {str(exc)[:300]}"
            ),
        )
    return None


class WorkerStatus:
    """The shard each loader worker is reading now, and since when, in shared memory: when the
    loader times out, the main process names the stuck shard. ``closing`` tells the workers that
    a SIGTERM now comes from the main process stopping them, not from a preemption."""

    SLOT = 512

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.urls = multiprocessing.RawArray(ctypes.c_char, self.SLOT * self.workers)
        self.since = multiprocessing.RawArray(ctypes.c_double, self.workers)
        self.closing = multiprocessing.RawValue(ctypes.c_bool, False)  # set by the main process as it stops them

    def close(self) -> None:
        self.closing.value = True

    def set(self, worker: int, url: str) -> None:
        raw = url.encode("utf-8", "replace")[: self.SLOT - 1]
        self.urls[worker * self.SLOT : (worker + 1) * self.SLOT] = raw.ljust(self.SLOT, b"\0")
        self.since[worker] = time.time()

    def describe(self) -> str:
        now, rows = time.time(), []
        for w in range(self.workers):
            url = bytes(self.urls[w * self.SLOT : (w + 1) * self.SLOT]).rstrip(b"\0").decode("utf-8", "replace")
            if url:
                rows.append(f"worker {w}: {url} (opened {now - self.since[w]:.0f} s ago)")
        return "; ".join(rows) or "no shard opened yet"


def buffer_shuffle(items: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Shuffle with a buffer of ``size`` items, fully drained at the end."""
    if size <= 1:
        yield from items
        return
    buf: list[Sample] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class StreamSpec:
    """Everything a stream needs; picklable, sent to loader workers."""

    urls: tuple[str, ...]
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 1000
    shuffle_shards: bool = True
    resampled: bool = False
    on_error: str = "skip"
    max_errors: int | None = None
    limits: ReadLimits = ReadLimits()


class ShardStream(IterableDataset):
    """Yields ``WorkerBatch``es forever. ``start`` maps logical worker -> Position;
    ``rotation`` relabels workers so that a resumed DataLoader's round-robin continues in order."""

    def __init__(
        self,
        spec: StreamSpec,
        ops: list[Op],
        *,
        start: dict[int, Position] | None = None,
        rotation: int = 0,
        status: WorkerStatus | None = None,
    ):
        super().__init__()
        self.spec, self.ops = spec, ops
        self.start, self.rotation, self.status = dict(start or {}), rotation, status

    def epoch_urls(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        s = self.spec
        if s.resampled:
            rng = random.Random(derive_seed(s.seed, "resample", epoch, s.rank, worker))
            n = max(1, len(s.urls) // (s.world_size * num_workers))
            return [rng.choice(s.urls) for _ in range(n)]
        order = list(s.urls)
        if s.shuffle_shards:
            random.Random(derive_seed(s.seed, "shards", epoch)).shuffle(order)
        return order[s.rank :: s.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[WorkerBatch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (wid + self.rotation) % nw
        pos = self.start.get(worker, Position())
        errors = ErrorCounter(self.spec.on_error, self.spec.max_errors, pos.errors)
        epoch, skip, pending = pos.epoch, pos.emitted, []
        while True:
            emitted = 0
            for sample in self._epoch_samples(epoch, worker, nw, errors, skip):
                emitted += 1
                if emitted <= skip:
                    errors.muted = emitted < skip  # count again from exactly where the saved counts stop
                    continue
                out = self._process(sample, epoch, worker, emitted - 1, errors)
                if out is not None:
                    pending.append(out)
                if len(pending) == self.spec.batch_size:
                    yield self._collate(pending, worker, Position(epoch, emitted, dict(errors.counts), out_url(sample)))
                    pending = []
            self._check_epoch(epoch, worker, emitted, skip)
            epoch, skip = epoch + 1, 0

    def _epoch_samples(self, epoch: int, worker: int, nw: int, errors: ErrorCounter, skip: int) -> Iterator[Sample]:
        errors.muted = skip > 0
        rng = random.Random(derive_seed(self.spec.seed, "buffer", epoch, self.spec.rank, worker))
        urls = self.epoch_urls(epoch, worker, nw)
        info = get_worker_info()
        slot = info.id if info is not None else 0
        on_shard = (lambda url: self.status.set(slot, url)) if self.status is not None else None
        samples = read_samples(urls, errors.handler, self.spec.limits, on_shard)
        return buffer_shuffle(samples, self.spec.shuffle_buffer, rng)

    def _check_epoch(self, epoch: int, worker: int, emitted: int, skip: int) -> None:
        if emitted == 0:
            raise DataError(
                f"rank {self.spec.rank} worker {worker}: epoch {epoch} had no readable samples in "
                f"{len(self.spec.urls)} shard(s); check data.train"
            )
        if skip > emitted:
            raise DataError(
                f"resume point ({skip} samples into epoch {epoch}) is past the end of the epoch "
                f"({emitted}): the shards changed since the checkpoint"
            )

    def _process(self, sample: Sample, epoch: int, worker: int, index: int, errors: ErrorCounter) -> Sample | None:
        # Seed only the CPU generator (ops run on CPU): torch.manual_seed also queues lazy CUDA
        # seeding with a captured stack trace, ~1 ms a sample. Restore it so the caller's RNG is untouched.
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(derive_seed(self.spec.seed, "sample", epoch, self.spec.rank, worker, index))
        try:
            out = process_sample(self.ops, sample, errors)
            for modality in (out or {}).pop("__absent__", ()):  # optional modalities this sample lacks: counted, kept
                errors.note(f"absent_{modality}")
            return out
        finally:
            gen.set_state(saved)

    @staticmethod
    def _collate(samples: list[Sample], worker: int, position: Position) -> WorkerBatch:
        keys = [k for k, v in samples[0].items() if isinstance(v, torch.Tensor)]
        data = {k: torch.stack([s[k] for s in samples]) for k in keys if k not in RAGGED_KEYS}
        for k in set(keys) & set(RAGGED_KEYS):  # variable length: concatenated, with offsets (B + 1,)
            parts = [s[k] for s in samples]
            data[k] = torch.cat(parts)
            data[RAGGED_KEYS[k]] = torch.tensor([0, *itertools.accumulate(len(x) for x in parts)])
        return WorkerBatch(data, [s["__key__"] for s in samples], worker, position)


def out_url(sample: Sample) -> str:
    return str(sample.get("__url__", ""))
