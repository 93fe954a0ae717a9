"""The batcher: a bounded per-process queue in front of the one model worker thread.

Contract:

- ``admit`` reserves a queue slot before a request's body is decoded, or raises
  :class:`QueueFullError` at once (429 with ``Retry-After``), so a full server refuses work
  before spending CPU on it; ``submit`` turns the reservation into a queued request (or, without
  one, checks the bound itself) and ``release`` frees an unused reservation. Nothing is queued
  for a rejected request.
- Requests of one stream are served in arrival order, one batch of a stream at a time.
  Consecutive requests of the same stream with the same ``adapt`` flag coalesce into one
  adaptation batch of at most ``max_batch`` images (a single larger request runs alone). When
  the worker is idle it waits at most ``max_delay`` after a stream's first pending request for
  more to arrive.
- Streams are served round-robin by the arrival of their first pending request.
- A request whose deadline passed before its batch started fails with
  :class:`DeadlineExceededError` (504) and never touches the stream; a batch that has started
  always completes.
- ``run_batch`` runs in a dedicated worker thread, never on the event loop. If it raises,
  every request of that batch gets the error and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from tta_server.errors import DeadlineExceededError, QueueFullError
from tta_server.state.base import StreamKey, StreamRecord

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")


@dataclass
class Ticket:
    """A reserved queue slot; ``used`` once submitted or released."""

    used: bool = False


@dataclass
class PendingRequest(Generic[R]):
    """One request waiting for its batch."""

    record: StreamRecord
    images: np.ndarray
    adapt: bool
    deadline: float
    future: asyncio.Future[tuple[R, slice]]
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> StreamKey:
        return self.record.key

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


def take_batch(
    queue: deque[PendingRequest[R]], max_batch: int, now: float
) -> tuple[list[PendingRequest[R]], list[PendingRequest[R]]]:
    """Pop the leading requests that form one batch; also return those already past their deadline.

    Expired requests at the head are dropped first. Then requests are taken while they share
    the first one's ``adapt`` flag and the total stays within ``max_batch`` (the first request
    is always taken, whatever its size).
    """
    expired: list[PendingRequest[R]] = []
    batch: list[PendingRequest[R]] = []
    total = 0
    while queue:
        head = queue[0]
        if head.deadline <= now:
            expired.append(queue.popleft())
            continue
        if batch and (head.adapt != batch[0].adapt or total + head.size > max_batch):
            break
        batch.append(queue.popleft())
        total += head.size
    return batch, expired


def queued_images(queue: deque[PendingRequest[R]]) -> int:
    """Images waiting in one stream's queue."""
    return sum(r.size for r in queue)


RunBatch = Callable[[StreamRecord, np.ndarray, bool], R]


class Batcher(Generic[R]):
    """Coalesces requests per stream and runs them on one worker thread."""

    def __init__(
        self,
        run_batch: RunBatch[R],
        max_batch: int = 64,
        max_delay: float = 0.005,
        max_queue: int = 256,
        timeout: float = 30.0,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.timeout = timeout
        self._on_batch = on_batch
        self._pending: dict[StreamKey, deque[PendingRequest[R]]] = {}
        self._ready: asyncio.Queue[StreamKey] | None = None
        self._queued = 0
        self._reserved = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tta-runner")
        self._task: asyncio.Task[None] | None = None
        self._busy_seconds = 0.05

    @property
    def depth(self) -> int:
        """Requests waiting (not yet running)."""
        return self._queued

    @property
    def reserved(self) -> int:
        """Admitted requests still decoding (they hold a queue slot)."""
        return self._reserved

    def _refuse_when_full(self) -> None:
        waiting = self._queued + self._reserved
        if waiting >= self.max_queue:
            retry = max(1.0, round(self._busy_seconds * waiting / max(self.max_batch, 1), 1))
            raise QueueFullError(f"request queue is full ({waiting} waiting); retry later", retry_after=retry)

    def admit(self) -> Ticket:
        """Reserve a queue slot for a request about to be decoded; 429 at once when none is free."""
        self._refuse_when_full()
        self._reserved += 1
        return Ticket()

    def release(self, ticket: Ticket) -> None:
        """Free a reservation that was not submitted (idempotent)."""
        if not ticket.used:
            ticket.used = True
            self._reserved -= 1

    async def start(self) -> None:
        self._ready = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="tta-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in self._pending.values():
            for request in queue:
                if not request.future.done():
                    request.future.set_exception(DeadlineExceededError("the server is shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=True)

    def run_in_worker(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run other torch work (stream reset, state import) on the same worker thread, in order."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def submit(
        self, record: StreamRecord, images: np.ndarray, adapt: bool, ticket: Ticket | None = None
    ) -> tuple[R, slice]:
        """Queue ``images`` for the stream of ``record``; returns the batch result and this request's rows in it.

        The registration travels with the request, so the worker never reads it again. With a
        ``ticket`` from :meth:`admit` the slot is already held.
        """
        if self._ready is None:
            raise RuntimeError("batcher is not started")
        if ticket is None or ticket.used:
            self._refuse_when_full()
        else:
            self.release(ticket)
        loop = asyncio.get_running_loop()
        request: PendingRequest[R] = PendingRequest(
            record, images, adapt, time.monotonic() + self.timeout, loop.create_future()
        )
        key = record.key
        queue = self._pending.setdefault(key, deque())
        queue.append(request)
        self._queued += 1
        if len(queue) == 1:
            self._ready.put_nowait(key)
        return await request.future

    async def _loop(self) -> None:
        if self._ready is None:
            raise RuntimeError("batcher is not started")
        while True:
            key = await self._ready.get()
            queue = self._pending.get(key)
            if not queue:
                continue
            wait = queue[0].enqueued_at + self.max_delay - time.monotonic()
            if wait > 0 and queued_images(queue) < self.max_batch:
                await asyncio.sleep(wait)
            batch, expired = take_batch(queue, self.max_batch, time.monotonic())
            self._queued -= len(batch) + len(expired)
            for request in expired:
                if not request.future.done():
                    request.future.set_exception(
                        DeadlineExceededError(f"request waited more than {self.timeout:.1f}s in the queue")
                    )
            if batch:
                await self._run(key, batch)
            if queue:
                self._ready.put_nowait(key)
            else:
                self._pending.pop(key, None)

    async def _run(self, key: StreamKey, batch: list[PendingRequest[R]]) -> None:
        images = batch[0].images if len(batch) == 1 else np.concatenate([r.images for r in batch])
        started = time.perf_counter()
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_batch, batch[0].record, images, batch[0].adapt
            )
        except Exception as exc:
            log.warning("batch of %d images for stream %s failed: %s", len(images), key, exc)
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        self._busy_seconds = 0.8 * self._busy_seconds + 0.2 * elapsed
        if self._on_batch is not None:
            self._on_batch(len(images), len(batch))
        start = 0
        for request in batch:
            if not request.future.done():
                request.future.set_result((result, slice(start, start + request.size)))
            start += request.size
