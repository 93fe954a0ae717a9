"""The state store contract: the same tests against the memory store and the real Redis store.

Both stores must agree on everything the server relies on: registration and its errors,
paged listing per tenant and across tenants (creation time, then tenant/stream id), deletion,
compare-and-set state writes, summaries without tensors, and the count. The Redis store runs
against the shared test Redis under a key prefix of its own (deleted afterwards).
Behaviour only one store has (LRU and idle expiry in memory; replicas, write-behind, outages
and restarts in Redis) is tested in tests/unit/test_memory_store.py and tests/integration/.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from adapters.base import StateMeta, StreamState
from tests.integration.conftest import prefix, redis_url  # noqa: F401 (fixtures of the Redis variant)
from tta_server.state.base import (
    StateStore,
    StreamExistsError,
    StreamKey,
    StreamNotFoundError,
    StreamRecord,
    VersionConflictError,
)
from tta_server.state.memory import MemoryStateStore
from tta_server.state.redis import RedisStateStore


def record(tenant: str, sid: str, created: float = 0.0) -> StreamRecord:
    return StreamRecord(StreamKey(tenant, sid), "m", "bn", {"a": 1, "b": [0.5]}, 7, {"site": "x"}, created_at=created)


def state(value: float, step: int = 0) -> StreamState:
    return StreamState({"x": torch.full((3,), value), "n": torch.tensor(step)}, StateMeta("bn", {}, "h", step=step))


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> Iterator[StateStore]:
    if request.param == "memory":
        yield MemoryStateStore()
        return
    redis_store = RedisStateStore(request.getfixturevalue("redis_url"), key_prefix=request.getfixturevalue("prefix"))
    yield redis_store
    redis_store.close()


def test_create_get_and_duplicate(store: StateStore) -> None:
    store.create_stream(record("a", "s", created=12.5))
    assert store.get_stream(StreamKey("a", "s")) == record("a", "s", created=12.5)  # round-trips exactly
    with pytest.raises(StreamExistsError, match="'s' already exists"):
        store.create_stream(record("a", "s", created=99.0))
    store.create_stream(record("b", "s"))  # the same id in another tenant is another stream
    assert store.get_stream(StreamKey("b", "s")).key.tenant == "b"
    with pytest.raises(StreamNotFoundError, match="'nope' does not exist"):
        store.get_stream(StreamKey("a", "nope"))
    with pytest.raises(StreamNotFoundError):
        store.get_stream(StreamKey("c", "s"))


def test_listing_pages_by_creation_time_per_tenant_and_for_all(store: StateStore) -> None:
    for i in range(3):
        store.create_stream(record("a", f"s{i}", created=100.0 + i))
    store.create_stream(record("b", "s0", created=50.0))
    store.create_stream(record("b", "r", created=100.0))  # same time as a/s0: ordered by tenant/id
    page, total = store.list_streams("a", offset=1, limit=1)
    assert total == 3 and [r.key.stream_id for r in page] == ["s1"]
    assert store.list_streams("a", offset=5, limit=10) == ([], 3)
    assert store.list_streams("nobody", 0, 10) == ([], 0)
    everyone, total_all = store.list_streams(None, 0, 10)
    assert total_all == 5 and [str(r.key) for r in everyone] == ["b/s0", "a/s0", "b/r", "a/s1", "a/s2"]
    assert everyone[1] == record("a", "s0", created=100.0)
    assert [str(r.key) for r in store.list_streams(None, 3, 10)[0]] == ["a/s1", "a/s2"]


def test_delete_removes_registration_state_and_listing(store: StateStore) -> None:
    key = StreamKey("a", "s0")
    store.create_stream(record("a", "s0", created=1.0))
    store.create_stream(record("a", "s1", created=2.0))
    store.save_state(key, state(1.0, 1), 0, 1)
    store.delete_stream(key)
    for call in (
        lambda: store.get_stream(key),
        lambda: store.delete_stream(key),
        lambda: store.load_state(key),
        lambda: store.save_state(key, state(2.0, 2), 1, 2),
    ):
        with pytest.raises(StreamNotFoundError, match="'s0' does not exist"):
            call()
    assert [r.key.stream_id for r in store.list_streams("a", 0, 10)[0]] == ["s1"]
    assert store.state_summaries([key]) == {}
    store.create_stream(record("a", "s0", created=3.0))  # the id is free again, and starts fresh
    assert store.load_state(key) is None
    assert [r.created_at for r in store.list_streams("a", 0, 10)[0]] == [2.0, 3.0]


def test_save_and_load_round_trip(store: StateStore) -> None:
    key = StreamKey("t", "s")
    store.create_stream(record("t", "s"))
    assert store.load_state(key) is None
    assert store.save_state(key, state(1.5, 1), 0, 4) == 1
    loaded = store.load_state(key)
    assert loaded is not None and (loaded.version, loaded.samples_seen, loaded.state.meta.step) == (1, 4, 1)
    assert torch.equal(loaded.state.tensors["x"], torch.full((3,), 1.5))
    assert torch.equal(loaded.state.tensors["n"], torch.tensor(1))


def test_compare_and_set_refuses_stale_writes(store: StateStore) -> None:
    key = StreamKey("t", "s")
    store.create_stream(record("t", "s"))
    assert store.save_state(key, state(1.0, 1), 0, 4) == 1
    assert store.save_state(key, state(2.0, 2), 1, 8) == 2
    with pytest.raises(VersionConflictError, match="version 2, write was based on 1"):
        store.save_state(key, state(9.0, 9), 1, 12)
    with pytest.raises(VersionConflictError, match="version 2, write was based on 0"):
        store.save_state(key, state(9.0, 9), 0, 12)
    with pytest.raises(VersionConflictError, match="version 2, write was based on 5"):
        store.save_state(key, state(9.0, 9), 5, 12)
    stored = store.load_state(key)
    assert stored is not None and stored.version == 2 and stored.samples_seen == 8
    assert float(stored.state.tensors["x"][0]) == 2.0


def test_state_summaries_describe_states_without_tensors(store: StateStore) -> None:
    with_state, without = StreamKey("t", "a"), StreamKey("t", "b")
    store.create_stream(record("t", "a"))
    store.create_stream(record("t", "b"))
    store.save_state(with_state, state(1.0, 3), 0, 12)
    summaries = store.state_summaries([with_state, without, StreamKey("t", "gone")])
    assert list(summaries) == [with_state]
    summary = summaries[with_state]
    assert (summary.version, summary.steps, summary.samples_seen) == (1, 3, 12)
    assert summary.state_bytes > 0 and summary.updated_at > 0
    assert store.state_summaries([]) == {}


def test_count_follows_registrations_and_deletions(store: StateStore) -> None:
    assert store.count() == 0
    for i in range(3):
        store.create_stream(record("a", f"s{i}"))
    store.create_stream(record("b", "s0"))
    assert store.count() == 4
    with pytest.raises(StreamExistsError):
        store.create_stream(record("a", "s0"))
    store.delete_stream(StreamKey("a", "s1"))
    with pytest.raises(StreamNotFoundError):
        store.delete_stream(StreamKey("a", "s1"))
    assert store.count() == 3


def test_tenants_and_ids_with_separators_never_collide(store: StateStore) -> None:
    odd, plain = StreamKey("a/b{x}", "c"), StreamKey("a", "b{x}/c")
    store.create_stream(record(odd.tenant, odd.stream_id, created=1.0))
    store.create_stream(record(plain.tenant, plain.stream_id, created=2.0))
    store.save_state(odd, state(1.0, 1), 0, 1)
    assert store.get_stream(odd).key == odd and store.get_stream(plain).key == plain
    assert store.load_state(plain) is None
    assert [r.key for r in store.list_streams(odd.tenant, 0, 10)[0]] == [odd]
    assert [r.key for r in store.list_streams(None, 0, 10)[0]] == [odd, plain]
