from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import pytest

from tta_server.errors import DeadlineExceededError, QueueFullError
from tta_server.serving.batcher import Batcher, Job, JobResults, PendingRequest, RunJobs, take_batch
from tta_server.state.base import StreamKey, StreamRecord

A = StreamRecord(StreamKey("t", "a"), "m", "source", {}, 0)
B = StreamRecord(StreamKey("t", "b"), "m", "source", {}, 0)


def _req(n: int, adapt: bool = True, deadline: float = 1e18) -> PendingRequest[int]:
    loop = asyncio.new_event_loop()
    try:
        return PendingRequest(A, np.zeros((n, 2, 2, 3), np.uint8), adapt, deadline, loop.create_future())
    finally:
        loop.close()


def test_take_batch_coalesces_up_to_max_and_same_flag() -> None:
    queue = deque([_req(3), _req(3), _req(3), _req(1, adapt=False)])
    batch, expired = take_batch(queue, max_batch=6, now=0)
    assert [r.size for r in batch] == [3, 3] and not expired and len(queue) == 2
    batch, _ = take_batch(queue, max_batch=6, now=0)
    assert [r.size for r in batch] == [3] and queue[0].adapt is False
    batch, _ = take_batch(queue, max_batch=6, now=0)
    assert [(r.size, r.adapt) for r in batch] == [(1, False)] and not queue


def test_take_batch_takes_an_oversized_request_alone_and_drops_expired() -> None:
    queue = deque([_req(2, deadline=5), _req(10), _req(1)])
    batch, expired = take_batch(queue, max_batch=4, now=10)
    assert [r.size for r in expired] == [2]
    assert [r.size for r in batch] == [10] and len(queue) == 1


R = TypeVar("R")


def per_job(fn: Callable[[StreamRecord, np.ndarray, bool], R]) -> RunJobs[R]:
    """A ``run_jobs`` that runs ``fn`` per job (errors per job, as the model worker reports them)."""

    def run(jobs: Sequence[Job]) -> JobResults[R]:
        if len(jobs) == 1:
            return JobResults([fn(jobs[0].record, jobs[0].images, jobs[0].adapt)])
        out: list[R | BaseException] = []
        for job in jobs:
            try:
                out.append(fn(job.record, job.images, job.adapt))
            except Exception as exc:
                out.append(exc)
        return JobResults(out)

    return run


def _run(coro_fn: object) -> None:
    asyncio.run(coro_fn())  # type: ignore[operator]


def test_requests_of_a_stream_coalesce_in_arrival_order() -> None:
    calls: list[tuple[StreamRecord, int, bool]] = []

    def run_batch(key: StreamRecord, images: np.ndarray, adapt: bool) -> list[int]:
        calls.append((key, len(images), adapt))
        return [int(v) for v in images[:, 0, 0, 0]]

    async def main() -> None:
        batcher: Batcher[list[int]] = Batcher(per_job(run_batch), max_batch=8, max_delay=0.05)
        await batcher.start()
        imgs = [np.full((2, 1, 1, 3), i, np.uint8) for i in range(3)]
        results = await asyncio.gather(*(batcher.submit(A, im, True) for im in imgs))
        await batcher.stop()
        assert calls == [(A, 6, True)]
        for i, (out, rows) in enumerate(results):
            assert out[rows] == [i, i]

    _run(main)


async def _until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Wait (on the loop) until ``condition`` holds; fail after a generous deadline."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_queue_full_is_refused_immediately() -> None:
    release, running = threading.Event(), threading.Event()

    def run_batch(key: StreamRecord, images: np.ndarray, adapt: bool) -> int:
        running.set()
        release.wait(30)
        return len(images)

    async def main() -> None:
        batcher: Batcher[int] = Batcher(per_job(run_batch), max_batch=1, max_delay=0, max_queue=1)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(A, np.zeros((1, 1, 1, 3), np.uint8), True))
        await _until(running.is_set)
        second = asyncio.create_task(batcher.submit(A, np.zeros((1, 1, 1, 3), np.uint8), True))
        await _until(lambda: batcher.depth == 1)
        with pytest.raises(QueueFullError) as info:
            await batcher.submit(B, np.zeros((1, 1, 1, 3), np.uint8), True)
        assert info.value.retry_after >= 1
        with pytest.raises(QueueFullError):
            batcher.admit()
        release.set()
        assert (await first)[0] == 1 and (await second)[0] == 1
        await batcher.stop()

    _run(main)


def test_admission_tickets_hold_a_slot_until_submitted_or_released() -> None:
    async def main() -> None:
        batcher: Batcher[int] = Batcher(
            per_job(lambda r, images, a: len(images)), max_batch=4, max_delay=0, max_queue=2
        )
        await batcher.start()
        first, second = batcher.admit(), batcher.admit()
        assert batcher.reserved == 2
        with pytest.raises(QueueFullError):
            batcher.admit()  # both slots are held by requests still decoding
        batcher.release(first)
        batcher.release(first)  # idempotent
        assert batcher.reserved == 1
        result, _ = await batcher.submit(A, np.zeros((2, 1, 1, 3), np.uint8), True, second)
        assert result == 2 and batcher.reserved == 0 and batcher.depth == 0
        batcher.release(second)  # a submitted ticket is not released twice
        assert batcher.reserved == 0
        await batcher.stop()

    _run(main)


def test_deadline_expires_before_running_and_failures_stay_in_their_batch() -> None:
    release, running = threading.Event(), threading.Event()
    ran: list[StreamRecord] = []

    def run_batch(key: StreamRecord, images: np.ndarray, adapt: bool) -> int:
        ran.append(key)
        if key == A:
            running.set()
            release.wait(30)
            raise RuntimeError("model exploded")
        return 7

    async def main() -> None:
        batcher: Batcher[int] = Batcher(per_job(run_batch), max_batch=4, max_delay=0, timeout=0.1)
        await batcher.start()
        failing = asyncio.create_task(batcher.submit(A, np.zeros((1, 1, 1, 3), np.uint8), True))
        await _until(running.is_set)
        late = asyncio.create_task(batcher.submit(B, np.zeros((1, 1, 1, 3), np.uint8), True))
        await asyncio.sleep(0.2)  # B's deadline (0.1 s) has passed for sure while A still runs
        release.set()
        with pytest.raises(RuntimeError, match="exploded"):
            await failing
        with pytest.raises(DeadlineExceededError):
            await late
        assert ran == [A]  # the expired request never ran
        batcher.timeout = 5
        result, _ = await batcher.submit(B, np.zeros((1, 1, 1, 3), np.uint8), True)
        assert result == 7  # the loop survived the failure
        await batcher.stop()

    _run(main)


def test_streams_are_served_round_robin() -> None:
    order: list[str] = []

    def run_batch(key: StreamRecord, images: np.ndarray, adapt: bool) -> None:
        order.append(key.key.stream_id)
        time.sleep(0.01)

    async def main() -> None:
        batcher: Batcher[None] = Batcher(per_job(run_batch), max_batch=1, max_delay=0)
        await batcher.start()
        img = np.zeros((1, 1, 1, 3), np.uint8)
        tasks = [batcher.submit(A, img, True) for _ in range(3)] + [batcher.submit(B, img, True) for _ in range(3)]
        await asyncio.gather(*tasks)
        await batcher.stop()

    _run(main)
    assert order == ["a", "b", "a", "b", "a", "b"]


def _record(name: str, method: str = "bn") -> StreamRecord:
    return StreamRecord(StreamKey("t", name), "m", method, {}, 0)


def _group(record: StreamRecord) -> tuple[str, str]:
    return record.model, record.method


def test_streams_of_one_group_fuse_into_one_batch_and_keep_their_rows() -> None:
    calls: list[list[tuple[str, int, bool]]] = []

    def run_jobs(jobs: Sequence[Job]) -> JobResults[list[int]]:
        calls.append([(j.record.key.stream_id, len(j.images), j.adapt) for j in jobs])
        return JobResults([[int(v) for v in j.images[:, 0, 0, 0]] for j in jobs])

    async def main() -> None:
        batcher: Batcher[list[int]] = Batcher(run_jobs, max_batch=8, max_delay=0, group_of=_group)
        await batcher.start()
        other = _record("z", method="tent")  # another group: never fused with the bn streams
        submits = [
            batcher.submit(_record(n), np.full((2, 1, 1, 3), i, np.uint8), n != "c") for i, n in enumerate("abc")
        ]
        submits.append(batcher.submit(other, np.full((1, 1, 1, 3), 9, np.uint8), True))
        results = await asyncio.gather(*submits)
        await batcher.stop()
        assert calls == [[("a", 2, True), ("b", 2, True), ("c", 2, False)], [("z", 1, True)]]
        for i, (out, rows) in enumerate(results[:3]):
            assert out[rows] == [i, i]
        assert results[3][0][results[3][1]] == [9]

    _run(main)


def test_fused_batches_respect_max_batch_one_segment_per_stream_and_fairness() -> None:
    calls: list[list[str]] = []

    def run_jobs(jobs: Sequence[Job]) -> JobResults[int]:
        calls.append([j.record.key.stream_id for j in jobs])
        return JobResults([len(j.images) for j in jobs])

    async def main() -> None:
        batcher: Batcher[int] = Batcher(run_jobs, max_batch=4, max_delay=0, group_of=_group)
        await batcher.start()
        busy = [batcher.submit(_record("busy"), np.zeros((4, 1, 1, 3), np.uint8), True) for _ in range(3)]
        quiet = [batcher.submit(_record(n), np.zeros((1, 1, 1, 3), np.uint8), True) for n in "pq"]
        await asyncio.gather(*busy, *quiet)
        await batcher.stop()
        # the busy stream fills a batch alone; the quiet streams are served right after it, not after all of it
        assert calls[0] == ["busy"] and calls[1] == ["p", "q"] and calls[2:] == [["busy"], ["busy"]]

    _run(main)


def test_no_delay_without_a_joiner_and_a_decoding_request_is_waited_for() -> None:
    calls: list[list[str]] = []

    def run_jobs(jobs: Sequence[Job]) -> JobResults[int]:
        calls.append([j.record.key.stream_id for j in jobs])
        return JobResults([len(j.images) for j in jobs])

    async def main() -> None:
        batcher: Batcher[int] = Batcher(run_jobs, max_batch=8, max_delay=30.0, group_of=_group)
        await batcher.start()
        started = time.monotonic()
        await batcher.submit(_record("alone"), np.zeros((1, 1, 1, 3), np.uint8), True)
        assert time.monotonic() - started < 10  # nothing could join: no 30 s wait
        ticket = batcher.admit()  # a request of another stream is being decoded
        first = asyncio.create_task(batcher.submit(_record("a"), np.zeros((1, 1, 1, 3), np.uint8), True))
        await _until(lambda: batcher.depth == 1)
        second = asyncio.create_task(batcher.submit(_record("b"), np.zeros((1, 1, 1, 3), np.uint8), True, ticket))
        await asyncio.gather(first, second)
        await batcher.stop()
        assert calls == [["alone"], ["a", "b"]]

    _run(main)


def test_a_failing_stream_in_a_fused_batch_fails_alone() -> None:
    after: list[str] = []

    def run_jobs(jobs: Sequence[Job]) -> JobResults[int]:
        results: list[int | BaseException] = [
            RuntimeError("bad state") if j.record.key.stream_id == "bad" else len(j.images) for j in jobs
        ]
        return JobResults(results, after=lambda: after.append("observed"))

    async def main() -> None:
        batcher: Batcher[int] = Batcher(run_jobs, max_batch=8, max_delay=0, group_of=_group)
        await batcher.start()
        good = batcher.submit(_record("good"), np.zeros((2, 1, 1, 3), np.uint8), True)
        bad = batcher.submit(_record("bad"), np.zeros((1, 1, 1, 3), np.uint8), True)
        outcomes = await asyncio.gather(good, bad, return_exceptions=True)
        await _until(lambda: after == ["observed"])  # the deferred work runs after the answers
        await batcher.stop()
        assert outcomes[0] == (2, slice(0, 2))
        assert isinstance(outcomes[1], RuntimeError)
        assert after == ["observed"]

    _run(main)


def test_a_lone_small_batch_runs_inline_and_anything_else_on_the_worker() -> None:
    """Inline only for one stream's batch of at most ``inline_max_images`` images, with nothing else
    queued or decoding and the worker thread idle; torch work never runs on two threads at once."""
    threads: list[tuple[str, int, str]] = []
    worker_busy = threading.Event()
    release = threading.Event()

    def run_jobs(jobs: Sequence[Job]) -> JobResults[int]:
        threads.append(
            (jobs[0].record.key.stream_id, sum(len(j.images) for j in jobs), threading.current_thread().name)
        )
        return JobResults([len(j.images) for j in jobs])

    def block_worker() -> None:
        worker_busy.set()
        release.wait(30)

    async def main() -> None:
        batcher: Batcher[int] = Batcher(run_jobs, max_batch=8, max_delay=0, group_of=_group, inline_max_images=2)
        await batcher.start()
        loop_thread = threading.current_thread().name
        one = np.zeros((1, 1, 1, 3), np.uint8)
        assert await batcher.submit(_record("small"), np.zeros((2, 1, 1, 3), np.uint8), True) == (2, slice(0, 2))
        await batcher.submit(_record("large"), np.zeros((3, 1, 1, 3), np.uint8), True)
        # the worker holds other torch work (a reset): the lone small batch must wait for it, not run beside it
        blocker = batcher.run_in_worker(block_worker)
        await _until(worker_busy.is_set)
        waiting = asyncio.create_task(batcher.submit(_record("behind"), one, True))
        await _until(lambda: batcher.worker_pending == 2)  # handed to the busy worker, behind the reset
        release.set()
        await asyncio.gather(blocker, waiting)
        # two streams admitted together (both decoding, then queued) fuse and run on the worker
        tickets = [batcher.admit(), batcher.admit()]
        await asyncio.gather(
            batcher.submit(_record("a"), one, True, tickets[0]), batcher.submit(_record("b"), one, True, tickets[1])
        )
        await _until(lambda: batcher.worker_pending == 0)
        await batcher.stop()
        by_stream = {stream: (images, thread) for stream, images, thread in threads}
        assert by_stream["small"] == (2, loop_thread)
        assert by_stream["large"][1] != loop_thread
        assert by_stream["behind"][1] != loop_thread
        assert by_stream["a"] == (2, by_stream["large"][1])

    _run(main)


def test_small_batches_stop_running_inline_once_they_are_slow() -> None:
    """The loop reads no request while it runs a batch: a slow small batch sends the next ones to the worker."""
    threads: list[str] = []

    def run_jobs(jobs: Sequence[Job]) -> JobResults[int]:
        threads.append(threading.current_thread().name)
        time.sleep(0.05)  # a slow model: 50 ms per small batch
        return JobResults([len(j.images) for j in jobs])

    async def main() -> None:
        batcher: Batcher[int] = Batcher(run_jobs, max_delay=0, inline_max_images=1, inline_max_seconds=0.005)
        await batcher.start()
        for _ in range(3):
            await batcher.submit(_record("s"), np.zeros((1, 1, 1, 3), np.uint8), True)
        await batcher.stop()
        loop_thread = threading.current_thread().name
        assert threads[0] == loop_thread  # nothing measured yet
        assert loop_thread not in threads[1:]  # 0.2 * 50 ms > 5 ms: never again inline

    _run(main)


def test_inline_is_off_by_default_and_with_zero() -> None:
    threads: list[str] = []

    def run_jobs(jobs: Sequence[Job]) -> JobResults[int]:
        threads.append(threading.current_thread().name)
        return JobResults([len(j.images) for j in jobs])

    async def main() -> None:
        for batcher in (Batcher(run_jobs, max_delay=0), Batcher(run_jobs, max_delay=0, inline_max_images=0)):
            await batcher.start()
            await batcher.submit(_record("s"), np.zeros((1, 1, 1, 3), np.uint8), True)
            await batcher.stop()
        assert threading.current_thread().name not in threads and len(threads) == 2

    _run(main)


def _count_streams(calls: list[list[str]]) -> RunJobs[int]:
    def run_jobs(jobs: Sequence[Job]) -> JobResults[int]:
        calls.append(sorted(j.record.key.stream_id for j in jobs))
        return JobResults([len(j.images) for j in jobs])

    return run_jobs


def test_streams_coming_back_one_by_one_after_a_batch_share_the_next_one() -> None:
    """Clients that each wait for their answer return a little apart: the worker waits while they keep
    arriving (``gather_quiet`` apart) instead of starting a small batch with the first one back."""
    calls: list[list[str]] = []

    async def main() -> None:
        batcher: Batcher[int] = Batcher(
            _count_streams(calls), max_batch=8, max_delay=30.0, group_of=_group, gather_quiet=10.0
        )
        await batcher.start()
        one = np.zeros((1, 1, 1, 3), np.uint8)
        await asyncio.gather(*(batcher.submit(_record(n), one, True) for n in "abcd"))
        back = []
        for n in "abcd":
            back.append(asyncio.create_task(batcher.submit(_record(n), one, True)))
            await asyncio.sleep(0.02)
        await asyncio.gather(*back)
        await batcher.stop()
        assert calls == [["a", "b", "c", "d"], ["a", "b", "c", "d"]]

    _run(main)


def test_without_more_arrivals_a_lone_request_after_a_batch_waits_only_the_quiet_gap() -> None:
    calls: list[list[str]] = []

    async def main() -> None:
        batcher: Batcher[int] = Batcher(
            _count_streams(calls), max_batch=8, max_delay=60.0, group_of=_group, gather_quiet=0.05
        )
        await batcher.start()
        one = np.zeros((1, 1, 1, 3), np.uint8)
        await asyncio.gather(*(batcher.submit(_record(n), one, True) for n in "abcd"))
        started = time.monotonic()
        await batcher.submit(_record("a"), one, True)
        waited = time.monotonic() - started
        await batcher.stop()
        assert calls == [["a", "b", "c", "d"], ["a"]]
        assert waited < 30  # the quiet gap (50 ms), not max_delay (60 s)

    _run(main)


def test_one_client_sending_one_image_at_a_time_never_waits_for_the_quiet_gap() -> None:
    calls: list[list[str]] = []

    async def main() -> None:
        batcher: Batcher[int] = Batcher(
            _count_streams(calls), max_batch=8, max_delay=60.0, group_of=_group, gather_quiet=60.0
        )
        await batcher.start()
        started = time.monotonic()
        for _ in range(3):
            await batcher.submit(_record("s"), np.zeros((1, 1, 1, 3), np.uint8), True)
        waited = time.monotonic() - started
        await batcher.stop()
        assert calls == [["s"]] * 3
        assert waited < 30  # as many images queued as the previous batch had: nothing more to wait for

    _run(main)


def _running_task() -> str:
    """The name of the asyncio task running this code; ``worker`` off the event loop's thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return "worker"
    return task.get_name() if task is not None else "worker"


def test_a_lone_request_runs_in_its_own_task_and_one_that_others_may_join_through_the_loop() -> None:
    """Nothing queued, decoding or running: the submitting task runs the batch itself (the loop's task is not
    woken). A request that another request being decoded may join is queued and fused as before."""
    ran: list[tuple[list[str], str]] = []

    def run_jobs(jobs: Sequence[Job]) -> JobResults[int]:
        ran.append(([j.record.key.stream_id for j in jobs], _running_task()))
        return JobResults([len(j.images) for j in jobs])

    async def main() -> None:
        batcher: Batcher[int] = Batcher(run_jobs, max_batch=8, max_delay=5.0, group_of=_group, inline_max_images=2)
        await batcher.start()
        one = np.zeros((1, 1, 1, 3), np.uint8)
        assert await batcher.submit(_record("alone"), one, True) == (1, slice(0, 1))
        decoding = batcher.admit()  # a second request is being decoded: the next one waits for it
        first = asyncio.create_task(batcher.submit(_record("a"), one, True), name="client-a")
        await _until(lambda: batcher.depth == 1)
        assert ran == [(["alone"], "main")]  # "a" was queued, not run
        assert await batcher.submit(_record("b"), one, True, decoding) == (1, slice(0, 1))
        assert await first == (1, slice(0, 1))
        await batcher.stop()
        assert ran[1] == (["a", "b"], "worker")  # two streams fused, on the worker thread

    async def named() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.set_name("main")
        await main()

    _run(named)


def test_requests_that_reach_an_idle_batcher_together_still_fuse() -> None:
    """A server reads the requests that arrived together in one turn of the loop and each runs to ``submit``
    without waiting; the first must not run alone then, or every later one would too (one image per batch)."""
    calls: list[list[str]] = []

    def run_jobs(jobs: Sequence[Job]) -> JobResults[int]:
        calls.append([j.record.key.stream_id for j in jobs])
        return JobResults([len(j.images) for j in jobs])

    async def main() -> None:
        batcher: Batcher[int] = Batcher(run_jobs, max_batch=8, max_delay=0, group_of=_group, inline_max_images=4)
        await batcher.start()
        one = np.zeros((1, 1, 1, 3), np.uint8)
        for _ in range(3):  # also after a turn in which the batches were of one image
            answers = await asyncio.gather(*(batcher.submit(_record(f"s{i}"), one, True) for i in range(4)))
            assert answers == [(1, slice(0, 1))] * 4
            assert await batcher.submit(_record("lone"), one, True) == (1, slice(0, 1))
        await batcher.stop()
        assert calls == [["s0", "s1", "s2", "s3"], ["lone"]] * 3

    _run(main)
