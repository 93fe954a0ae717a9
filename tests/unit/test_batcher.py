from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import pytest

from tta_server.errors import DeadlineExceededError, QueueFullError
from tta_server.serving.batcher import Batcher, PendingRequest, take_batch
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


def _run(coro_fn: object) -> None:
    asyncio.run(coro_fn())  # type: ignore[operator]


def test_requests_of_a_stream_coalesce_in_arrival_order() -> None:
    calls: list[tuple[StreamRecord, int, bool]] = []

    def run_batch(key: StreamRecord, images: np.ndarray, adapt: bool) -> list[int]:
        calls.append((key, len(images), adapt))
        return [int(v) for v in images[:, 0, 0, 0]]

    async def main() -> None:
        batcher: Batcher[list[int]] = Batcher(run_batch, max_batch=8, max_delay=0.05)
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
        batcher: Batcher[int] = Batcher(run_batch, max_batch=1, max_delay=0, max_queue=1)
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
        batcher: Batcher[int] = Batcher(lambda r, images, a: len(images), max_batch=4, max_delay=0, max_queue=2)
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
        batcher: Batcher[int] = Batcher(run_batch, max_batch=4, max_delay=0, timeout=0.1)
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
        batcher: Batcher[None] = Batcher(run_batch, max_batch=1, max_delay=0)
        await batcher.start()
        img = np.zeros((1, 1, 1, 3), np.uint8)
        tasks = [batcher.submit(A, img, True) for _ in range(3)] + [batcher.submit(B, img, True) for _ in range(3)]
        await asyncio.gather(*tasks)
        await batcher.stop()

    _run(main)
    assert order == ["a", "b", "a", "b", "a", "b"]
