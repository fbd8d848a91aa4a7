"""A deterministic, resumable webdataset stream, batched inside each loader worker.

Each (rank, logical worker) stream is a pure function of (seed, epoch):
    shards of epoch e  = shuffle(all shards, seed, e)[rank::world][worker::workers]
                         (or drawn with replacement when ``resampled``)
    raw samples        = webdataset's url_opener -> tar_file_expander -> group_by_keys
    order              = a seeded shuffle buffer, drained at the end of each epoch
    augmentation       = torch RNG seeded per sample from (seed, epoch, rank, worker, index)
A stream's position is ``(epoch, emitted)``: samples that left the shuffle buffer this
epoch. Resuming replays the epoch's raw tar bytes *without decoding* and skips that many,
so the batches that follow are identical to an uninterrupted run. Streams loop over
epochs forever; training length is set in steps.
"""
from __future__ import annotations

import hashlib
import logging
import random
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from mmpretrain.data.ops import Op, Sample, SampleError, apply_ops
from mmpretrain.errors import DataError  # noqa: F401  (re-exported)

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

    def pin_memory(self) -> "WorkerBatch":
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
    if isinstance(exc, FileNotFoundError):
        return "missing_shard"
    if isinstance(exc, (tarfile.TarError, EOFError)):
        return "corrupt_shard"
    return "read_error"


class _TailReader:
    """Wraps a shard's byte stream; remembers the byte count and the last block read."""

    def __init__(self, raw: Any):
        self.raw, self.total, self.tail = raw, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data[-512:])[-512:]
        return data

    def complete(self) -> bool:
        """True if the stream ended with tar's end-of-archive zero block at a block boundary."""
        while self.read(1 << 16):
            pass
        return self.total > 0 and self.total % 512 == 0 and self.tail == bytes(512)

    def close(self) -> None:
        self.raw.close()


def _expand_checked(opened: Iterator[dict], handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """webdataset's tar_file_expander, plus a check that each shard is complete:
    ``tarfile`` in stream mode stops silently at a truncated header."""
    for source in opened:
        reader = source["stream"] = _TailReader(source["stream"])
        yield from tar_file_expander([source], handler=handler)
        try:
            truncated = not reader.complete()
        except OSError as exc:
            truncated, reason = True, exc
        else:
            reason = "no end-of-archive marker"
        if truncated:
            handler(tarfile.ReadError(f"{source['url']}: truncated tar ({reason})"))
        reader.close()


def read_samples(urls: list[str], handler: Callable[[BaseException], bool]) -> Iterator[Sample]:
    """Raw samples (``{"__key__", "__url__", ext: bytes}``) from tar shards, in order.

    Missing, unreadable and truncated shards go to ``handler`` (skip-and-count or raise)."""
    opened = url_opener(({"url": u} for u in urls), handler=handler)
    return group_by_keys(_expand_checked(opened, handler), handler=handler)


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


class ShardStream(IterableDataset):
    """Yields ``WorkerBatch``es forever. ``start`` maps logical worker -> Position;
    ``rotation`` relabels workers so that a resumed DataLoader's round-robin continues in order."""

    def __init__(self, spec: StreamSpec, ops: list[Op], *, start: dict[int, Position] | None = None, rotation: int = 0):
        super().__init__()
        self.spec, self.ops = spec, ops
        self.start, self.rotation = dict(start or {}), rotation

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
        return buffer_shuffle(read_samples(urls, errors.handler), self.spec.shuffle_buffer, rng)

    def _check_epoch(self, epoch: int, worker: int, emitted: int, skip: int) -> None:
        if emitted == 0:
            raise DataError(f"rank {self.spec.rank} worker {worker}: epoch {epoch} had no readable samples in "
                            f"{len(self.spec.urls)} shard(s); check data.train")
        if skip > emitted:
            raise DataError(f"resume point ({skip} samples into epoch {epoch}) is past the end of the epoch "
                            f"({emitted}): the shards changed since the checkpoint")

    def _process(self, sample: Sample, epoch: int, worker: int, index: int, errors: ErrorCounter) -> Sample | None:
        # Seed only the CPU generator (ops run on CPU): torch.manual_seed also queues lazy CUDA
        # seeding with a captured stack trace, ~1 ms a sample. Restore it so the caller's RNG is untouched.
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(derive_seed(self.spec.seed, "sample", epoch, self.spec.rank, worker, index))
        try:
            out = apply_ops(self.ops, sample)
            for modality in out.pop("__absent__", ()):  # optional modalities this sample lacks: counted, kept
                errors.note(f"absent_{modality}")
            return out
        except SampleError as exc:
            errors.record(exc.kind, exc)
            return None
        finally:
            gen.set_state(saved)

    @staticmethod
    def _collate(samples: list[Sample], worker: int, position: Position) -> WorkerBatch:
        keys = [k for k, v in samples[0].items() if isinstance(v, torch.Tensor)]
        data = {k: torch.stack([s[k] for s in samples]) for k in keys}
        return WorkerBatch(data, [s["__key__"] for s in samples], worker, position)


def out_url(sample: Sample) -> str:
    return str(sample.get("__url__", ""))
