"""The batcher: a bounded per-process queue in front of the one model worker thread.

Contract:

- ``admit`` reserves a queue slot before a request's body is decoded, or raises
  :class:`QueueFullError` at once (429 with ``Retry-After``), so a full server refuses work
  before spending CPU on it; ``submit`` turns the reservation into a queued request (or, without
  one, checks the bound itself) and ``release`` frees an unused reservation. Nothing is queued
  for a rejected request.
- Requests of one stream are served in arrival order, one batch of a stream at a time.
  Consecutive requests of the same stream with the same ``adapt`` flag coalesce into one
  *segment* (that stream's adaptation batch; a single larger request runs alone).
- **Fusion.** Segments of different streams in the same fusion group (``group_of``: the same
  model, method and config, which one ``adapter.step_many`` can serve) join one fused batch of
  at most ``max_batch`` images; each stream contributes at most one segment, so a stream never
  has two batches in flight. ``group_of=None`` turns fusion off (one stream per batch).
- Streams are served round-robin by the arrival of their first pending request; a stream that
  was served goes to the back, so a busy stream never starves the others.
- Waiting: the worker waits at most ``max_delay`` (from the moment it could start) for more
  images, and only while more are on their way: a request that could still join is being
  decoded (it holds an admission ticket), or, with ``gather_quiet``, fewer images are queued than
  the previous batch had and requests keep arriving at most ``gather_quiet`` apart (the streams
  just answered are sending their next images: many clients that each wait for their answer
  then share one batch instead of splitting into a big and a small one, measured ~10% more
  images/s at 64 one-image streams). When nothing else is on its way, a batch starts at once:
  a lone client sending one image at a time pays no delay.
- A request whose deadline passed before its batch started fails with
  :class:`DeadlineExceededError` (504) and never touches the stream; a batch that has started
  always completes.
- ``run_jobs`` runs in a dedicated worker thread and returns one result (or exception) per
  job, so one stream's failure stays with its own requests. If it raises, every request of
  that batch gets the error and the loop goes on. ``after`` (the observers' deferred work) runs
  on the worker thread after the answers were handed back.
- **Inline.** A lone batch (one stream, at most ``inline_max_images`` images) while nothing
  else is queued or decoding and the worker thread has nothing left to run, runs on the event
  loop itself: the hand-off to the worker and back costs CPU on both threads, and nothing could
  run beside it anyway. Only while such small batches have recently been quick
  (``inline_max_seconds``, a moving average wherever they ran): the loop reads no request while
  it runs one. Torch work still never runs on two threads at once: the loop does not hand
  anything to the worker while it runs a batch, and runs none while the worker has work.
- **At once.** A request that finds nothing queued, decoding or running (and would run inline)
  is queued, waits one turn of the loop, and when it is still alone then, leaves the queue and
  runs its batch in its own task: no wake-up of the loop's task and no hand-back of the result.
  The turn matters: a server reads the requests that arrived together in one turn, and each
  reaches ``submit`` without waiting, so without it the first would run alone, then the next,
  and concurrent clients would never share a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from tta_server.errors import DeadlineExceededError, QueueFullError
from tta_server.observability import tracing
from tta_server.state.base import StreamKey, StreamRecord

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")


@dataclass(slots=True)
class Ticket:
    """A reserved queue slot; ``used`` once submitted or released."""

    used: bool = False


@dataclass(slots=True)
class PendingRequest(Generic[R]):
    """One request waiting for its batch."""

    record: StreamRecord
    images: np.ndarray
    adapt: bool
    deadline: float
    future: asyncio.Future[tuple[R, slice]]
    group: Hashable = None
    """The fusion group of the request's stream, computed once at submit (the loop compares it often)."""
    enqueued_at: float = field(default_factory=time.monotonic)
    enqueued_ns: int = field(default_factory=time.time_ns)
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    """The submitting request's context (request id, current span): its batch runs inside it."""

    @property
    def key(self) -> StreamKey:
        return self.record.key

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


class Job(NamedTuple):
    """One stream's segment of a batch: its registration, its images (concatenated requests), the adapt flag."""

    record: StreamRecord
    images: np.ndarray
    adapt: bool


class JobResults(NamedTuple, Generic[R]):
    """What ``run_jobs`` returns: one result or exception per job, and deferred work to run afterwards."""

    results: list[R | BaseException]
    after: Callable[[], None] | None = None


RunJobs = Callable[[Sequence[Job]], JobResults[R]]


def take_batch(
    queue: deque[PendingRequest[R]], max_batch: int, now: float, first_always: bool = True
) -> tuple[list[PendingRequest[R]], list[PendingRequest[R]]]:
    """Pop the leading requests that form one segment; also return those already past their deadline.

    Expired requests at the head are dropped first. Then requests are taken while they share
    the first one's ``adapt`` flag and the total stays within ``max_batch``. The first request
    is taken whatever its size when ``first_always`` (the batch's lead stream), else only if it fits.
    """
    expired: list[PendingRequest[R]] = []
    batch: list[PendingRequest[R]] = []
    total = 0
    while queue:
        head = queue[0]
        if head.deadline <= now:
            expired.append(queue.popleft())
            continue
        if batch and head.adapt != batch[0].adapt:
            break
        if total + head.size > max_batch and (batch or not first_always):
            break
        batch.append(queue.popleft())
        total += head.size
    return batch, expired


def queued_images(queue: deque[PendingRequest[R]]) -> int:
    """Images waiting in one stream's queue."""
    return sum(r.size for r in queue)


GroupOf = Callable[[StreamRecord], Hashable]


class Batcher(Generic[R]):
    """Coalesces requests per stream, fuses streams of one group, and runs batches on one worker thread."""

    def __init__(
        self,
        run_jobs: RunJobs[R],
        max_batch: int = 64,
        max_delay: float = 0.005,
        max_queue: int = 256,
        timeout: float = 30.0,
        on_batch: Callable[[int, int, int], None] | None = None,
        group_of: GroupOf | None = None,
        inline_max_images: int = 0,
        inline_max_seconds: float = 0.01,
        gather_quiet: float = 0.0,
    ) -> None:
        self._run_jobs = run_jobs
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.timeout = timeout
        self._on_batch = on_batch
        self._group_of = group_of
        self.inline_max_images = inline_max_images
        self.inline_max_seconds = inline_max_seconds
        self.gather_quiet = gather_quiet
        self._small_batch_seconds = 0.0  # moving average of batches small enough to run inline, wherever they ran
        self._worker_work: list[asyncio.Future[Any] | Future[Any]] = []
        self._pending: dict[StreamKey, deque[PendingRequest[R]]] = {}
        self._ready: OrderedDict[StreamKey, None] = OrderedDict()
        self._wake: asyncio.Event | None = None
        self._queued = 0
        self._reserved = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tta-runner")
        self._task: asyncio.Task[None] | None = None
        self._busy_seconds = 0.05
        self._last_batch_images = 0
        self._worker_free_at = 0.0
        self._running = False  # a batch is between its start and its answers (the loop's ``_run``)

    @property
    def depth(self) -> int:
        """Requests waiting (not yet running)."""
        return self._queued

    @property
    def reserved(self) -> int:
        """Admitted requests still decoding (they hold a queue slot)."""
        return self._reserved

    @property
    def fuses(self) -> bool:
        return self._group_of is not None

    # -- admission ------------------------------------------------------------------------
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
            self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="tta-batcher")
        await asyncio.sleep(0)  # the loop's task starts waiting for work now, not during a first request's turn

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
        self._ready.clear()
        self._executor.shutdown(wait=True)

    def run_in_worker(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run other torch work (stream reset, state import) on the same worker thread, in order."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, contextvars.copy_context().run, fn)
        self._worker_work.append(future)
        return future

    @property
    def worker_pending(self) -> int:
        """Work handed to the worker thread and not finished yet: batches, resets and imports, deferred observers."""
        self._worker_work = [f for f in self._worker_work if not f.done()]
        return len(self._worker_work)

    def _inline_allowed(self, images: int) -> bool:
        """A batch of ``images`` may run on the event loop: small, recently quick, nothing decoding, worker idle."""
        return (
            images <= self.inline_max_images
            and self._small_batch_seconds <= self.inline_max_seconds
            and self._reserved == 0
            and self.worker_pending == 0
        )

    def _runs_inline(self, segments: list[list[PendingRequest[R]]], images: int) -> bool:
        """A lone small batch with nothing queued, nothing decoding and an idle worker (see the module doc)."""
        return len(segments) == 1 and not self._ready and self._inline_allowed(images)

    # -- requests -------------------------------------------------------------------------
    async def submit(
        self, record: StreamRecord, images: np.ndarray, adapt: bool, ticket: Ticket | None = None
    ) -> tuple[R, slice]:
        """Queue ``images`` for the stream of ``record``; returns its segment's result and this request's rows.

        The registration travels with the request, so the worker never reads it again. With a
        ``ticket`` from :meth:`admit` the slot is already held.
        """
        if self._wake is None:
            raise RuntimeError("batcher is not started")
        if ticket is None or ticket.used:
            self._refuse_when_full()
        else:
            ticket.used = True
            self._reserved -= 1
        alone = self._runs_now(int(images.shape[0]))
        loop = asyncio.get_running_loop()
        request: PendingRequest[R] = PendingRequest(
            record, images, adapt, time.monotonic() + self.timeout, loop.create_future(), self._group(record)
        )
        queue = self._pending.setdefault(record.key, deque())
        queue.append(request)
        self._queued += 1
        if record.key not in self._ready:
            self._ready[record.key] = None
        if alone and await self._alone_after_a_turn(request):
            return self._run_now(request)
        self._poke()
        return await request.future

    # -- the loop -------------------------------------------------------------------------
    def _group(self, record: StreamRecord) -> Hashable:
        return self._group_of(record) if self._group_of is not None else record.key

    def _available(self, lead: StreamKey) -> int:
        """Images that could join a batch led by ``lead`` right now."""
        queue = self._pending.get(lead)
        if not queue:
            return 0
        if not self.fuses:
            return queued_images(queue)
        group = queue[0].group
        return sum(queued_images(q) for q in self._pending.values() if q and q[0].group == group)

    async def _gather(self, lead: StreamKey) -> None:
        """Wait, at most ``max_delay`` from the moment the worker could start, while more images are on their way.

        On their way: a request that could join is decoding, or (with ``gather_quiet``) fewer images
        are queued than the previous batch had and requests keep arriving at most ``gather_quiet``
        apart, i.e. the streams just answered are sending their next requests.
        """
        queue = self._pending[lead]
        deadline = max(queue[0].enqueued_at, self._worker_free_at) + self.max_delay
        while True:
            available = self._available(lead)
            if available >= self.max_batch or not self._more_expected(available):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._wake is None:
                return
            self._wake.clear()
            decoding = self._reserved > 0
            try:
                await asyncio.wait_for(self._wake.wait(), remaining if decoding else min(remaining, self.gather_quiet))
            except TimeoutError:
                if self._reserved == 0:
                    return  # quiet for gather_quiet: nothing more is arriving

    def _more_expected(self, available: int) -> bool:
        """A joiner is decoding, or the previous batch's streams may still be coming back."""
        if self._reserved > 0:
            return True
        return self.gather_quiet > 0 and available < self._last_batch_images

    def _collect(self, lead: StreamKey) -> list[tuple[StreamKey, list[PendingRequest[R]]]]:
        """The segments of the next batch: the lead stream's, then same-group streams in round-robin order."""
        now = time.monotonic()
        segments: list[tuple[StreamKey, list[PendingRequest[R]]]] = []
        total = 0
        group = self._pending[lead][0].group
        for key in [lead, *(k for k in self._ready if k != lead)]:
            queue = self._pending.get(key)
            if not queue or (key != lead and (total >= self.max_batch or queue[0].group != group)):
                continue
            batch, expired = take_batch(queue, self.max_batch - total, now, first_always=key == lead)
            self._fail_expired(expired)
            if batch:
                segments.append((key, batch))
                total += sum(r.size for r in batch)
            if not self.fuses:
                break
        for key in [lead, *(key for key, _ in segments)]:
            self._ready.pop(key, None)
            if self._pending.get(key):
                self._ready[key] = None  # served: to the back of the round
            else:
                self._pending.pop(key, None)
        return segments

    def _fail_expired(self, expired: list[PendingRequest[R]]) -> None:
        self._queued -= len(expired)
        for request in expired:
            if not request.future.done():
                request.future.set_exception(
                    DeadlineExceededError(f"request waited more than {self.timeout:.1f}s in the queue")
                )

    async def _loop(self) -> None:
        if self._wake is None:
            raise RuntimeError("batcher is not started")
        while True:
            if not self._ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            lead = next(iter(self._ready))
            if not self._pending.get(lead):
                self._ready.pop(lead, None)
                self._pending.pop(lead, None)
                continue
            await self._gather(lead)
            segments = self._collect(lead)
            self._queued -= sum(len(batch) for _, batch in segments)
            if segments:
                await self._run([batch for _, batch in segments])

    @staticmethod
    def _trace_queue_waits(segments: list[list[PendingRequest[R]]]) -> None:
        """One ``tta.queue_wait`` span per request, from its queueing to now (its batch starts), in its own trace."""
        if tracing.enabled():
            now = time.time_ns()
            for batch in segments:
                for request in batch:
                    request.context.run(tracing.record_span, "tta.queue_wait", request.enqueued_ns, now)

    def _run_traced(self, jobs: list[Job]) -> JobResults[R]:
        with tracing.span("tta.batch", {"tta.streams": len(jobs), "tta.images": sum(len(j.images) for j in jobs)}):
            return self._run_jobs(jobs)

    def _runs_now(self, images: int, queued: int = 0) -> bool:
        """A batch of ``images`` would run inline and start at once: nothing (but the ``queued`` request itself)
        queued, no batch running, and no joiner expected (:meth:`_more_expected`)."""
        return (
            self._queued == queued
            and not self._running
            and self._inline_allowed(images)
            and not self._more_expected(images)
        )

    async def _alone_after_a_turn(self, request: PendingRequest[R]) -> bool:
        """After one turn of the loop, whether ``request`` is still alone (then it is taken out of the queue).

        Requests that reached the server together with this one were read in the same turn but
        have not reached ``submit`` yet (nothing awaits between reading a small body and
        submitting it); the turn lets them queue behind this one, which then joins their batch.
        """
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._poke()  # the request stays queued, as any cancelled waiter's does: the loop serves it
            raise
        return self._take_if_alone(request)

    def _take_if_alone(self, request: PendingRequest[R]) -> bool:
        """Take ``request`` back out of the queue when it is still the only one and may still run at once."""
        queue = self._pending.get(request.key)
        if not queue or queue[0] is not request or not self._runs_now(request.size, queued=1):
            return False
        del self._pending[request.key]
        self._ready.pop(request.key, None)
        self._queued = 0
        return True

    def _run_now(self, request: PendingRequest[R]) -> tuple[R, slice]:
        """Run a lone request's batch right here, in the submitting request's own task, once it left the queue.

        The same batch the loop would run inline a moment later (see :meth:`_runs_now`), without
        waking the loop's task and handing the result back through the request's future: a lone
        client sending one small request at a time saves two task switches per request.
        """
        self._trace_queue_waits([[request]])
        started = time.perf_counter()
        try:
            outcome = self._run_traced([Job(request.record, request.images, request.adapt)])
        except Exception as exc:
            log.warning("batch of %d images for 1 stream failed: %s", request.size, exc)
            raise
        finally:
            self._worker_free_at = time.monotonic()
        self._account(request.size, 1, 1, time.perf_counter() - started)
        self._defer(outcome.after, request.context)
        result = outcome.results[0]
        if isinstance(result, BaseException):
            raise result
        return result, slice(0, request.size)

    def _account(self, images: int, requests: int, streams: int, elapsed: float) -> None:
        """A finished batch's bookkeeping: its size and time (the gather and inline decisions read them), metrics."""
        self._last_batch_images = images
        self._busy_seconds = 0.8 * self._busy_seconds + 0.2 * elapsed
        if images <= self.inline_max_images:
            self._small_batch_seconds = 0.8 * self._small_batch_seconds + 0.2 * elapsed
        if self._on_batch is not None:
            self._on_batch(images, requests, streams)

    def _defer(self, after: Callable[[], None] | None, context: contextvars.Context) -> None:
        """Queue a batch's deferred work on the worker thread, not awaited: the next batch runs after it on that
        same thread, and the loop saves a wake-up per batch (the deferred observers log their own errors)."""
        if after is not None:
            self._worker_work.append(self._executor.submit(context.run, after))

    async def _run(self, segments: list[list[PendingRequest[R]]]) -> None:
        jobs = [
            Job(
                batch[0].record,
                batch[0].images if len(batch) == 1 else np.concatenate([r.images for r in batch]),
                batch[0].adapt,
            )
            for batch in segments
        ]
        images = sum(len(job.images) for job in jobs)
        started = time.perf_counter()
        self._running = True
        try:
            self._trace_queue_waits(segments)
            outcome = await self._execute(segments, jobs, images)
        except Exception as exc:
            log.warning("batch of %d images for %d streams failed: %s", images, len(jobs), exc)
            for batch in segments:
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
            return
        finally:
            self._worker_free_at = time.monotonic()
            self._running = False  # nothing below awaits: no request can start a batch before the answers are out
        self._account(images, sum(len(batch) for batch in segments), len(segments), time.perf_counter() - started)
        self._deliver(segments, outcome.results)
        self._defer(outcome.after, segments[0][0].context)

    async def _execute(self, segments: list[list[PendingRequest[R]]], jobs: list[Job], images: int) -> JobResults[R]:
        """Run the batch inline or on the worker thread, in the lead request's context (its logs and spans name it)."""
        context = segments[0][0].context
        if self._runs_inline(segments, images):
            return context.run(self._run_traced, jobs)
        future = asyncio.get_running_loop().run_in_executor(self._executor, context.run, self._run_traced, jobs)
        self._worker_work.append(future)
        return await future

    @staticmethod
    def _deliver(segments: list[list[PendingRequest[R]]], results: Sequence[R | BaseException]) -> None:
        """Every request's answer: its segment's result and its rows, or its segment's error."""
        for batch, result in zip(segments, results, strict=True):
            start = 0
            for request in batch:
                if not request.future.done():
                    if isinstance(result, BaseException):
                        request.future.set_exception(result)
                    else:
                        request.future.set_result((result, slice(start, start + request.size)))
                start += request.size
