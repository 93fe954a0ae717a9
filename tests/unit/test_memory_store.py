"""What only the memory store does: LRU bound, idle expiry, describing without touching.

The behaviour both stores share is in tests/contract/test_store_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from adapters.base import StateMeta, StreamState
from tta_server.state.base import StreamKey, StreamNotFoundError, StreamRecord
from tta_server.state.memory import MemoryStateStore


def record(tenant: str, sid: str, created: float = 0.0) -> StreamRecord:
    return StreamRecord(StreamKey(tenant, sid), "m", "bn", {}, 0, created_at=created)


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


def test_idle_expiry_keeps_every_recently_used_stream_in_any_use_order() -> None:
    """Expiry walks the least recently used end only; streams touched in any order still expire exactly."""
    now = [0.0]
    store = MemoryStateStore(ttl_seconds=10, clock=lambda: now[0])
    for sid in "abcdef":
        store.create_stream(record("t", sid))
    for t, sid in ((3, "d"), (4, "a"), (6, "f"), (7, "b"), (8, "a")):
        now[0] = t
        store.load_state(StreamKey("t", sid))
    now[0] = 16.5  # idle more than 10 s: c and e (0), d (3), f (6); a (8) and b (7) stay
    assert store.count() == 2
    assert sorted(r.key.stream_id for r in store.list_streams("t", 0, 10)[0]) == ["a", "b"]
    assert store.evictions == 4


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


def test_every_eviction_is_logged_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    evicted: list[tuple[StreamKey, str]] = []
    store = MemoryStateStore(
        max_streams=2, ttl_seconds=10, clock=lambda: now[0], on_evict=lambda k, why: evicted.append((k, why))
    )
    with caplog.at_level("WARNING", logger="tta_server.state.memory"):
        for sid in ("a", "b", "c"):  # c pushes a out
            store.create_stream(record("acme", sid))
        now[0] = 11  # b and c idle past the TTL
        assert store.count() == 0
    acme = [StreamKey("acme", sid) for sid in ("a", "b", "c")]
    assert evicted == [(acme[0], "lru"), (acme[1], "ttl"), (acme[2], "ttl")]
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 3 and "acme/a" in lines[0] and "(lru)" in lines[0] and "memory_max_streams" in lines[0]
    assert "acme/b" in lines[1] and "(ttl)" in lines[1] and "memory_ttl_s" in lines[1]


def test_the_server_counts_evictions_by_reason() -> None:
    from tta_server.metrics import Metrics
    from tta_server.state.factory import StoreOptions, open_store

    metrics = Metrics()
    store = open_store(StoreOptions(memory_max_streams=1), metrics)
    assert b'tta_streams_evicted_total{reason="lru"} 0.0' in metrics.render()
    assert b'tta_streams_evicted_total{reason="ttl"} 0.0' in metrics.render()
    store.create_stream(record("t", "a"))
    store.create_stream(record("t", "b"))
    assert b'tta_streams_evicted_total{reason="lru"} 1.0' in metrics.render()
