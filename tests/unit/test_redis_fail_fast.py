"""With the circuit open the Redis store never touches the network: every call answers from the
hot cache or raises StoreUnavailableError at once, and count() always answers from memory.

No Redis server: the store points at a port nothing listens on, and taking a connection from
its pool fails the test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from unittest import mock

import pytest
import redis
import torch

from adapters.base import StateMeta, StreamState
from tta_server.state.base import StoredState, StoreUnavailableError, StreamKey, StreamRecord
from tta_server.state.redis import RedisStateStore
from tta_server.state.redis.indexes import StreamCount


@pytest.fixture
def down_store() -> Iterator[RedisStateStore]:
    store = RedisStateStore("redis://127.0.0.1:1/0", retry_interval=3600, count_interval=3600, socket_timeout=0.5)
    deadline = time.monotonic() + 30  # the background count refresh gets "connection refused"
    while not store.down and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.down
    yield store
    store.close()


def test_no_call_touches_the_network_while_the_circuit_is_open(down_store: RedisStateStore) -> None:
    store = down_store
    cached = StreamRecord(StreamKey("t", "cached"), "m", "bn", {}, 0)
    entry = store.cache.remember(cached, None)
    state = StreamState({"x": torch.zeros(2)}, StateMeta("bn", {}, "h", step=1))
    store.cache.confirm(entry, StoredState(state, 1, 1, 0.0), "tok", 1, None)
    other = StreamKey("t", "other")
    no_io = AssertionError("network I/O while the circuit is open")
    with mock.patch.object(store.client.connection_pool, "get_connection", side_effect=no_io):
        for call in (
            lambda: store.create_stream(StreamRecord(other, "m", "bn", {}, 0)),
            lambda: store.list_streams(None, 0, 10),
            lambda: store.list_streams("t", 0, 10),
            lambda: store.delete_stream(cached.key),
            lambda: store.get_stream(other),
            lambda: store.load_state(other),
            lambda: store.save_state(other, state, 0, 1),
            lambda: store.state_summaries([other]),
            store.ping,
        ):
            with pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1:1/0"):
                call()
        assert store.count() == 0
        assert store.get_stream(cached.key) == cached
        loaded = store.load_state(cached.key)
        assert loaded is not None and loaded.version == 1
        assert store.save_state(cached.key, state, 1, 2) == 2  # kept in the cache, pending
        assert store.state_summaries([cached.key])[cached.key].version == 2
        assert store.pending_states() == 1
        assert store.flush_due(force=False) == 1  # no probe is due: nothing written, nothing read
        assert "unreachable" in (store.degradation() or "")


def test_the_count_keeps_local_changes_and_drops_refreshes_that_overlapped_one() -> None:
    counts = StreamCount()
    snapshot = counts.snapshot()
    assert counts.offer(snapshot, 5) and counts.value == 5
    snapshot = counts.snapshot()
    with counts.mutation() as m:  # a registration runs while the total is read
        assert counts.snapshot() is None
        m.adjust(+1)
    assert counts.value == 6
    assert not counts.offer(snapshot, 5)  # the read may have missed the registration: dropped
    assert counts.value == 6
    snapshot = counts.snapshot()
    with counts.mutation():
        assert not counts.offer(snapshot, 9)  # still under way
    counts.adjust(-10)
    assert counts.value == 0


def test_a_refresh_that_fails_with_an_error_reply_keeps_the_circuit_closed(down_store: RedisStateStore) -> None:
    store = down_store  # its one background refresh has run (and opened the circuit)
    with mock.patch.object(store.indexes, "total", side_effect=redis.ResponseError("NOPERM")):
        store.circuit.record_success()
        store.refresh_count()
        assert not store.down and store.count() == 0
