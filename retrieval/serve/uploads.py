"""Uploaded images, decoded away from the searches, and the CPU shared between the two.

A 16-megapixel PNG costs ~0.3 s of CPU to decode. On the event loop or a thread of the server it would
stall every search (the GIL); in a process of its own it still competes for the two cores, and on two
cores torch's two-thread team loses ~40% of its rate to *any* other busy process (measured: one
preempted thread stalls every parallel op), while a one-thread team loses nothing. So:

* ``Decoder``: uploads are decoded and preprocessed in a separate process at the lowest priority
  (nice 19), under an address-space limit (its size once started plus ``memory_mb``: an upload that
  needs more fails with ``MemoryError``, answered 400, and the server's memory is never at stake);
  each process is replaced after ``recycle_after`` uploads, and a crashed one at once; at most
  ``max_pending`` uploads wait (beyond that 503), a quarter of them from one client (beyond that 429);
  the service refuses an upload route from the headers when it would be refused (``refusal``).
* ``CpuShare``: searches first. While uploads are being decoded, the decoder is paused (SIGSTOP) during
  search batches, which run with all compute threads; once an upload has waited ``patience_s`` (0.25 s),
  at most one batch in three lets the decoder run beside it, with one compute thread. Uploads also get
  every idle gap between batches. (Sharing one batch in three whenever anything was decoding let a
  client that keeps two small uploads in the decoder slow every search by a third.)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
import torchvision.transforms.v2  # noqa: F401  (what decoding maps, loaded before the limit is measured)

from mmpretrain import api
from retrieval.errors import QueryError


class Busy(Exception):
    """Too much is waiting: the service answers ``status`` (503; 429 when it is this client's share) with
    ``retry_after``."""

    def __init__(self, detail: str, retry_after: float, *, status: int = 503):
        super().__init__(detail)
        self.retry_after, self.status = retry_after, status


def _worker_init(nice: int, memory_mb: int) -> None:
    os.nice(nice)  # uploads get the CPU the searches leave over
    torch.set_num_threads(1)
    if memory_mb > 0 and _address_space():
        limit = _address_space() + (memory_mb << 20)  # torch maps GBs of libraries: the budget is on top
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _address_space() -> int:
    """This process's virtual size in bytes (``VmSize``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) << 10
    return 0


def read_image(data: bytes, max_pixels: int):
    """Decode an upload (JPEG/PNG/WEBP/BMP/GIF only), refusing non-images and decompression bombs
    (more than ``max_pixels``, checked before decoding)."""
    if not data:
        raise QueryError("empty upload")
    try:
        return api.open_image(data, max_pixels=max_pixels)
    except api.ImageTooLarge as exc:
        raise QueryError(f"image of {exc}") from None
    except ValueError:  # not an image we decode
        raise QueryError("the upload is not a readable image (JPEG, PNG, WEBP, BMP or GIF)") from None


def _decode(transform, data: bytes, max_pixels: int):
    try:
        return transform(read_image(data, max_pixels))
    except MemoryError:
        raise QueryError("the image needs more memory to decode than an upload may use") from None


class Decoder:
    """``await decoder(transform, data, max_pixels)`` -> the preprocessed (3, H, W) tensor; an image
    that cannot be decoded within the limits raises ``QueryError`` (400), a full queue ``Busy``."""

    def __init__(
        self, workers: int = 1, max_pending: int = 8, nice: int = 19, *, memory_mb: int = 1024, recycle_after: int = 200
    ):
        self.workers, self.max_pending, self.nice = workers, max_pending, nice
        self.memory_mb, self.recycle_after = memory_mb, recycle_after
        self.pending, self._pool, self._done = 0, None, 0  # changed on the event loop only
        self._since: list[float] = []  # when each upload now decoding or waiting came in
        self.by_client: dict[str, int] = {}
        self.per_client = max(1, max_pending // 4)  # one client's uploads decoding or waiting at once

    def _executor(self):
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(self.nice, self.memory_mb),
            )
            self._done = 0
        return self._pool

    def waited(self) -> float:
        """Seconds the oldest upload now in the decoder has been there (0: none); read from any thread."""
        since = list(self._since)
        return time.monotonic() - min(since) if since else 0.0

    def pids(self) -> list[int]:
        """The decoder processes running now (ProcessPoolExecutor keeps them in ``_processes``)."""
        return list(getattr(self._pool, "_processes", None) or {}) if self._pool is not None else []

    def refusal(self, client: str = "") -> Busy | None:
        """Why an upload from ``client`` would be refused now (None: it would not)."""
        if self.pending >= self.max_pending:
            return Busy(f"{self.pending} uploads are being decoded", 2)
        if self.by_client.get(client, 0) >= self.per_client:
            return Busy(f"{self.per_client} of your uploads are being decoded; wait for them", 1, status=429)
        return None

    async def __call__(self, transform, data: bytes, max_pixels: int, client: str = ""):
        busy = self.refusal(client)
        if busy is not None:
            raise busy
        self.pending += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        came = time.monotonic()
        self._since.append(came)
        try:
            return await asyncio.wrap_future(self._executor().submit(_decode, transform, data, max_pixels))
        except BrokenProcessPool:
            self._pool = None  # a decoder died (a hostile file crashed it): the next upload gets a fresh one
            raise QueryError("the upload could not be decoded") from None
        finally:
            self.pending -= 1
            self._since.remove(came)
            left = self.by_client.pop(client) - 1
            if left:
                self.by_client[client] = left
            self._recycle()

    def _recycle(self) -> None:
        """After ``recycle_after`` uploads, once none is in flight, the next upload gets fresh processes
        (whatever a decoder library leaked or fragmented goes with the old ones)."""
        if self._pool is None:
            return
        self._done += 1
        if self.recycle_after and self._done >= self.recycle_after and not self.pending:
            self._pool.shutdown(wait=False)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class CpuShare:
    """``before()`` / ``after()`` each search batch (on the batcher's thread): see the module docstring."""

    def __init__(self, decoder: Decoder, every: int = 3, patience_s: float = 0.25):
        self.decoder, self.every, self.patience_s = decoder, every, patience_s
        self.batches, self.paused, self.threads, self.shared_at = 0, [], None, -every
        self.can_pause = hasattr(signal, "SIGSTOP")

    def before(self) -> None:
        if self.threads is None:
            self.threads = torch.get_num_threads()
        self.batches += 1
        busy = self.decoder.pending > 0
        due = self.batches - self.shared_at >= self.every and self.decoder.waited() > self.patience_s
        share = busy and (due or not self.can_pause)
        if share:
            self.shared_at = self.batches
        want = 1 if share else self.threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
        if busy and not share:
            self.paused = self.decoder.pids()
            self._signal(signal.SIGSTOP if self.can_pause else None)

    def after(self) -> None:
        if self.paused:
            self._signal(signal.SIGCONT)
            self.paused = []

    def _signal(self, sig) -> None:
        for pid in self.paused if sig is not None else ():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
