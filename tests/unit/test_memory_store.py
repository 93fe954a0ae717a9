from __future__ import annotations

import pytest
import torch

from adapters.base import StateMeta, StreamState
from tta_server.state.base import StreamExistsError, StreamKey, StreamNotFoundError, StreamRecord, VersionConflictError
from tta_server.state.memory import MemoryStateStore


def record(tenant: str, sid: str, created: float = 0.0) -> StreamRecord:
    return StreamRecord(StreamKey(tenant, sid), "m", "bn", {}, 0, created_at=created)


STATE = StreamState({"x": torch.zeros(2)}, StateMeta("bn", {}, "h"))


def test_compare_and_set_refuses_stale_writes() -> None:
    store = MemoryStateStore()
    key = StreamKey("t", "s")
    store.create_stream(record("t", "s"))
    assert store.load_state(key) is None
    assert store.save_state(key, STATE, 0, 4) == 1
    assert store.save_state(key, STATE, 1, 8) == 2
    with pytest.raises(VersionConflictError, match="version 2, write was based on 1"):
        store.save_state(key, STATE, 1, 12)
    stored = store.load_state(key)
    assert stored is not None and stored.version == 2 and stored.samples_seen == 8


def test_registry_errors_and_tenant_paging() -> None:
    store = MemoryStateStore()
    for i in range(3):
        store.create_stream(record("a", f"s{i}", created=i))
    store.create_stream(record("b", "s0"))
    with pytest.raises(StreamExistsError):
        store.create_stream(record("a", "s1"))
    page, total = store.list_streams("a", offset=1, limit=1)
    assert total == 3 and [r.key.stream_id for r in page] == ["s1"]
    assert store.list_streams(None, 0, 10)[1] == 4
    store.delete_stream(StreamKey("a", "s0"))
    with pytest.raises(StreamNotFoundError):
        store.get_stream(StreamKey("a", "s0"))
    assert store.get_stream(StreamKey("b", "s0")).key.tenant == "b"


def test_lru_bound_and_idle_ttl() -> None:
    now = [0.0]
    store = MemoryStateStore(max_streams=2, ttl_seconds=10, clock=lambda: now[0])
    store.create_stream(record("t", "a"))
    store.create_stream(record("t", "b"))
    store.get_stream(StreamKey("t", "a"))  # a is now the most recently used
    store.create_stream(record("t", "c"))  # evicts b
    with pytest.raises(StreamNotFoundError):
        store.get_stream(StreamKey("t", "b"))
    now[0] = 5
    store.get_stream(StreamKey("t", "c"))
    now[0] = 12  # a idle for 12s > 10s, c for 7s
    assert [r.key.stream_id for r in store.list_streams("t", 0, 10)[0]] == ["c"]
    assert store.count() == 1 and store.evictions == 2


def test_state_summaries_describe_without_touching() -> None:
    now = [0.0]
    store = MemoryStateStore(ttl_seconds=10, clock=lambda: now[0])
    with_state, without = StreamKey("t", "a"), StreamKey("t", "b")
    store.create_stream(record("t", "a"))
    store.create_stream(record("t", "b"))
    state = StreamState({"x": torch.zeros(4)}, StateMeta("bn", {}, "h", step=3))
    store.save_state(with_state, state, 0, 12)
    summaries = store.state_summaries([with_state, without, StreamKey("t", "gone")])
    assert list(summaries) == [with_state]
    summary = summaries[with_state]
    assert (summary.version, summary.steps, summary.samples_seen, summary.state_bytes) == (1, 3, 12, 16)
    now[0] = 11.0  # describing is not using: the idle TTL was not refreshed
    assert store.state_summaries([with_state]) == {} and store.count() == 0
