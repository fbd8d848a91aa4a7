"""Dynamic micro-batching, as Triton's dynamic batcher (``max_batch_size`` + ``max_queue_delay``) and
TorchServe (``batch_size`` + ``max_batch_delay``) do it: one worker thread owns the model; callers put
``(item, future)`` on a bounded queue; the worker takes what is waiting (up to ``max_batch``, waiting at
most ``max_wait_ms`` for more), runs one batch, and resolves the futures. A full queue refuses at once
(``Overloaded``: the service answers 503 with Retry-After), so load beyond capacity never becomes a
timeout. The event loop only awaits the futures.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Overloaded(RuntimeError):
    """The batcher's queue is full: try again later (``retry_after`` seconds is a fair guess)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 64  # items encoded and searched together
    max_wait_ms: float = 2.0  # how long the worker waits for more items once one is there
    max_queue: int = 64  # waiting items; beyond this, submit() raises Overloaded


class MicroBatcher(Generic[T]):
    """``submit(item) -> Future``; ``fn(items) -> results`` runs on one worker, one batch at a time. A
    result that is an ``Exception`` fails only its own future; an exception raised by ``fn`` fails the
    whole batch. ``on_batch(size, seconds)`` is called after each batch (metrics).

    The worker is a thread of its own (``thread=True``), or whichever thread calls ``run()``: the
    service runs it on the process's main thread, where torch's OpenMP team runs small batches 1.5-2.5x
    faster than from a second thread (measured: 5 vs 13 ms for one query, 25 vs 35 ms for 32)."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[Any]],
        cfg: BatchConfig = BatchConfig(),
        *,
        name: str = "batcher",
        on_batch: Callable[[int, float], None] | None = None,
        thread: bool = True,
        before_batch: Callable[[], None] | None = None,
        after_batch: Callable[[], None] | None = None,
    ):
        self.fn, self.cfg, self.name, self.on_batch = fn, cfg, name, on_batch
        self.before_batch, self.after_batch = before_batch, after_batch
        self._queue: queue.Queue = queue.Queue()  # bounded in submit(), so close() can always enqueue its stop
        self._seconds_per_item = 0.01  # running estimate, for Retry-After
        self._thread = threading.Thread(target=self.run, name=name, daemon=True) if thread else None
        if self._thread is not None:
            self._thread.start()

    def submit(self, item: T) -> Future:
        future: Future = Future()
        waiting = self._queue.qsize()
        if waiting >= self.cfg.max_queue:
            wait = max(1.0, round(waiting * self._seconds_per_item + 0.5))
            raise Overloaded(f"{self.name}: {waiting} requests are waiting; try again shortly", retry_after=wait)
        self._queue.put_nowait((item, future))
        return future

    def depth(self) -> int:
        """Items waiting (not counting the batch being run)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the worker after the batch it is running (from any thread)."""
        self._queue.put((None, None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _take(self) -> list[tuple[T, Future]] | None:
        first = self._queue.get()
        if first[1] is None:
            return None
        batch, deadline = [first], time.monotonic() + self.cfg.max_wait_ms / 1000
        while len(batch) < self.cfg.max_batch:
            try:
                wait = deadline - time.monotonic()
                item = self._queue.get_nowait() if wait <= 0 else self._queue.get(timeout=wait)
            except queue.Empty:
                break
            if item[1] is None:  # close(): finish this batch, then stop
                self._queue.put(item)
                break
            batch.append(item)
        return batch

    def run(self) -> None:
        """The worker loop: batches until ``close()``."""
        while (batch := self._take()) is not None:
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]  # skip timed-out ones
            if not live:
                continue
            if self.before_batch is not None:
                self.before_batch()
            start = time.perf_counter()
            try:
                results = self.fn([item for item, _ in live])
            except Exception as exc:  # the batch failed as a whole: every caller learns why
                log.exception("%s: batch of %d failed", self.name, len(live))
                results = [exc] * len(live)
            finally:
                if self.after_batch is not None:
                    self.after_batch()
            seconds = time.perf_counter() - start
            self._seconds_per_item = 0.8 * self._seconds_per_item + 0.2 * seconds / len(live)
            for (_, fut), result in zip(live, results):
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
            if self.on_batch is not None:
                self.on_batch(len(live), seconds)
