"""The Redis store against a real Redis: compare-and-set across replicas, the hot cache, the key
layout (hash tags), idle TTL, write-behind and idempotent writes. The semantics it shares with the
memory store are in tests/contract/test_store_contract.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import redis
import torch
from redis.crc import key_slot

from adapters.base import Segment, StateMeta, StreamState
from adapters.norms import NormKind
from adapters.packed import PackedTensors
from adapters.registry import create_adapter
from adapters.segments import stacked
from adapters.serialize import state_from_bytes
from tests.contract.test_adapter_contract import batches, tiny_model
from tta_server.metrics import Metrics
from tta_server.state.base import (
    StreamKey,
    StreamNotFoundError,
    StreamRecord,
    VersionConflictError,
)
from tta_server.state.redis import RedisStateStore
from tta_server.state.write_policy import WriteMode, WritePolicy

pytestmark = pytest.mark.integration

StoreFactory = Callable[..., RedisStateStore]


def record(tenant: str, sid: str, created: float = 0.0) -> StreamRecord:
    return StreamRecord(StreamKey(tenant, sid), "m", "bn", {"a": 1}, 7, {"site": "x"}, created_at=created)


def state(value: float, step: int = 0) -> StreamState:
    return StreamState({"x": torch.full((3,), value), "n": torch.tensor(step)}, StateMeta("bn", {}, "h", step=step))


@pytest.fixture
def make_store(redis_url: str, prefix: str) -> Iterator[StoreFactory]:
    """Stores on the test's prefix (several = several replicas); all closed at teardown."""
    stores: list[RedisStateStore] = []

    def make(**kwargs: object) -> RedisStateStore:
        store = RedisStateStore(redis_url, key_prefix=prefix, **kwargs)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def test_two_replicas_never_overwrite_each_other(make_store: StoreFactory) -> None:
    a, b = make_store(), make_store()
    key = StreamKey("t", "shared")
    a.create_stream(record("t", "shared"))
    assert a.load_state(key) is None and b.load_state(key) is None
    assert b.save_state(key, state(1.0, 1), 0, 2) == 1
    with pytest.raises(VersionConflictError, match="version 1, write was based on 0"):
        a.save_state(key, state(5.0, 1), 0, 2)
    reloaded = a.load_state(key)  # after a conflict the reload reads what b wrote
    assert reloaded is not None and reloaded.version == 1 and float(reloaded.state.tensors["x"][0]) == 1.0
    assert a.save_state(key, state(2.0, 2), 1, 4) == 2
    seen_by_b = b.load_state(key)  # b's cache held version 1: the load notices version 2
    assert seen_by_b is not None and seen_by_b.version == 2 and float(seen_by_b.state.tensors["x"][0]) == 2.0


def test_hot_cache_skips_transfer_when_current(make_store: StoreFactory) -> None:
    store = make_store()
    key = StreamKey("t", "hot")
    store.create_stream(record("t", "hot"))
    store.save_state(key, state(1.0, 1), 0, 1)
    with mock.patch("tta_server.state.redis.store.state_from_bytes", wraps=state_from_bytes) as decode:
        for _ in range(3):
            loaded = store.load_state(key)
            assert loaded is not None and loaded.version == 1
        assert decode.call_count == 0
        make_store().save_state(key, state(2.0, 2), 1, 2)  # another replica writes
        loaded = store.load_state(key)
        assert loaded is not None and loaded.version == 2 and decode.call_count == 1


def test_keys_share_a_hash_tag_and_tenants_cannot_collide(
    make_store: StoreFactory, redis_url: str, prefix: str
) -> None:
    store = make_store()
    odd = StreamKey("a/b{x}", "c")
    store.create_stream(record(odd.tenant, odd.stream_id))
    store.create_stream(record("a", "b"))
    store.save_state(odd, state(1.0, 1), 0, 1)
    rec_key, state_key = store.keys.record(odd), store.keys.state(odd)
    assert key_slot(rec_key.encode()) == key_slot(state_key.encode())
    assert rec_key == f"{prefix}:{{a%2Fb%7Bx%7D/c}}:rec"
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.exists(rec_key, state_key) == 2
        assert int(client.hget(state_key, "v") or 0) == 1 and int(client.hget(state_key, "s") or 0) == 1
    finally:
        client.close()
    assert store.get_stream(odd).key == odd and store.list_streams(odd.tenant, 0, 10)[1] == 1


def test_deleted_then_recreated_stream_starts_fresh(make_store: StoreFactory) -> None:
    a, b = make_store(), make_store()
    key = StreamKey("t", "again")
    a.create_stream(record("t", "again", created=1.0))
    a.save_state(key, state(1.0, 1), 0, 1)
    b.delete_stream(key)
    b.create_stream(record("t", "again", created=2.0))
    assert a.get_stream(key).created_at == 2.0
    assert a.load_state(key) is None  # a's cached version 1 belonged to the deleted stream
    assert [r.created_at for r in a.list_streams("t", 0, 10)[0]] == [2.0]


def test_idle_ttl_expires_streams_and_access_refreshes_it(make_store: StoreFactory) -> None:
    # idle expires once 2 s have passed (sleeps guarantee at least that); busy only needs each
    # turn of the loop to take under the 2 s TTL, which holds on a loaded machine too
    ttl = 2.0
    store = make_store(ttl_seconds=ttl)
    idle, busy = StreamKey("t", "idle"), StreamKey("t", "busy")
    store.create_stream(record("t", "idle"))
    store.create_stream(record("t", "busy"))
    store.save_state(busy, state(1.0, 1), 0, 1)
    started = time.monotonic()
    while time.monotonic() - started <= ttl + 0.2:  # busy is touched every 0.25 s, idle is not
        time.sleep(0.25)
        assert store.get_stream(busy).key == busy
        assert store.load_state(busy) is not None
    other = make_store(ttl_seconds=ttl)
    with pytest.raises(StreamNotFoundError):
        other.get_stream(idle)
    page, total = other.list_streams("t", 0, 10)
    assert [r.key for r in page] == [busy] and total == 1
    deadline = time.monotonic() + 30  # count() answers from memory; the background thread re-reads it
    while other.count() != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert other.count() == 1


def test_write_behind_every_n_steps_and_flush_on_close(make_store: StoreFactory) -> None:
    store = make_store(policy=WritePolicy(WriteMode.WRITE_BEHIND, every_steps=3, every_seconds=60))
    reader = make_store(cache_max_streams=0)
    key = StreamKey("t", "wb")
    store.create_stream(record("t", "wb"))
    assert store.load_state(key) is None
    for version in (1, 2):
        assert store.save_state(key, state(float(version), version), version - 1, version) == version
    assert reader.load_state(key) is None and store.pending_states() == 1
    with pytest.raises(VersionConflictError, match="version 2, write was based on 1"):
        store.save_state(key, state(9.0), 1, 1)  # stale against the local history
    store.save_state(key, state(3.0, 3), 2, 3)
    persisted = reader.load_state(key)
    assert persisted is not None and persisted.version == 3 and store.pending_states() == 0
    store.save_state(key, state(4.0, 4), 3, 4)
    local = store.load_state(key)
    assert local is not None and local.version == 4  # served from the cache: Redis is at 3
    assert (reader.load_state(key) or persisted).version == 3
    store.close()
    final = reader.load_state(key)
    assert final is not None and final.version == 4 and final.state.meta.step == 4


def test_write_behind_flushes_after_t_seconds(make_store: StoreFactory) -> None:
    store = make_store(policy=WritePolicy(WriteMode.WRITE_BEHIND, every_steps=100, every_seconds=0.3))
    reader = make_store(cache_max_streams=0)
    key = StreamKey("t", "timed")
    store.create_stream(record("t", "timed"))
    store.load_state(key)
    store.save_state(key, state(1.0, 1), 0, 1)

    def flushed() -> bool:  # exactly what is asserted: Redis has version 1 and the writer holds nothing pending
        stored = reader.load_state(key)
        return stored is not None and stored.version == 1 and store.pending_states() == 0

    deadline = time.monotonic() + 30  # the flush is due after 0.3 s; a loaded machine may take much longer
    while not flushed() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flushed(), (reader.load_state(key), store.pending_states())


def test_write_behind_conflict_discards_local_steps_and_counts_them(make_store: StoreFactory) -> None:
    metrics = Metrics()
    store = make_store(policy=WritePolicy(WriteMode.WRITE_BEHIND, every_steps=2, every_seconds=60), metrics=metrics)
    other = make_store()
    key = StreamKey("t", "split")
    store.create_stream(record("t", "split"))
    store.load_state(key)
    store.save_state(key, state(1.0, 1), 0, 1)  # pending in store's cache
    other.load_state(key)
    other.save_state(key, state(7.0, 1), 0, 1)  # a second replica (the documented misuse)
    with pytest.raises(VersionConflictError, match=r"1 unpersisted steps of this replica discarded"):
        store.save_state(key, state(2.0, 2), 1, 2)
    assert metrics.store_errors.labels("flush_conflict")._value.get() == 1
    reloaded = store.load_state(key)
    assert reloaded is not None and float(reloaded.state.tensors["x"][0]) == 7.0


def test_a_retried_write_is_recognised_not_reported_as_conflict(make_store: StoreFactory) -> None:
    """redis-py retries a command once when the connection drops; the token makes that safe."""
    store = make_store()
    key = StreamKey("t", "retry")
    store.create_stream(record("t", "retry"))
    rec = store.get_stream(key)
    new = store.load_state(key)
    assert new is None
    from tta_server.state.base import StoredState

    stored = StoredState(state(1.0, 1), 1, 1, time.time())
    token = uuid.uuid4().hex
    assert store.scripts.write(key, rec, stored, 0, token, [], False) == (1, 1)
    assert store.scripts.write(key, rec, stored, 0, token, [], False) == (1, 1)  # the replay: applied once
    assert store.scripts.write(key, rec, stored, 0, uuid.uuid4().hex, [], False) == (2, 1)  # someone else: conflict
    later = StoredState(state(3.0, 3), 3, 3, time.time())
    # A write whose outcome was never learned (token) is accepted as this replica's own base.
    assert store.scripts.write(key, rec, later, 0, uuid.uuid4().hex, [token], False) == (1, 3)


def test_state_summaries_read_small_fields_and_pending_steps_from_the_cache(make_store: StoreFactory) -> None:
    writer = make_store(policy=WritePolicy(WriteMode.WRITE_BEHIND, every_steps=2, every_seconds=60))
    reader = make_store(cache_max_streams=0)
    key, empty = StreamKey("t", "sum"), StreamKey("t", "empty")
    writer.create_stream(record("t", "sum"))
    writer.create_stream(record("t", "empty"))
    writer.save_state(key, state(1.0, 1), 0, 8)
    pending = writer.state_summaries([key, empty])
    assert list(pending) == [key] and (pending[key].version, pending[key].steps, pending[key].samples_seen) == (1, 1, 8)
    assert reader.state_summaries([key, empty]) == {}  # nothing persisted yet
    writer.save_state(key, state(2.0, 2), 1, 16)  # second step: flushed
    with mock.patch.object(RedisStateStore, "load_state", side_effect=AssertionError("blob read")):
        remote = reader.state_summaries([key])[key]
    assert (remote.version, remote.steps, remote.samples_seen) == (2, 2, 16)
    blob = reader.client.hget(reader.keys.state(key), "b")
    assert isinstance(blob, bytes) and remote.state_bytes == len(blob) > 0
    assert remote.updated_at == pytest.approx(time.time(), abs=60)


@pytest.mark.parametrize("method", ["unmix_tns", "tent"])
def test_states_a_fused_step_packs_round_trip_and_fuse_again(make_store: StoreFactory, method: str) -> None:
    """A fused step returns states packed in one buffer per stream (adapters/packed.py); written to
    Redis and read back by another replica they hold the same tensors, and stack again alike."""
    adapter = create_adapter(method)
    model = adapter.prepare(tiny_model(NormKind.BN))
    xs = batches(3, size=2, seed=5)
    fused = adapter.step_many(model, [Segment(x, adapter.init_state(model, seed=i)) for i, x in enumerate(xs)])
    assert all(isinstance(r.state.tensors, PackedTensors) for r in fused)
    writer, reader = make_store(), make_store(cache_max_streams=0)
    loaded = []
    for i, result in enumerate(fused):
        key = StreamKey("t", f"{method}-{i}")
        writer.create_stream(record("t", key.stream_id))
        assert writer.save_state(key, result.state, 0, 2) == 1
        stored = reader.load_state(key)
        assert stored is not None and stored.version == 1 and stored.state.meta == result.state.meta
        assert stored.state.tensors.keys() == result.state.tensors.keys()
        for name, value in result.state.tensors.items():
            assert torch.equal(stored.state.tensors[name], value), name
        loaded.append(stored.state)
    again = stacked([s.tensors for s in loaded])
    for name, value in stacked([r.state.tensors for r in fused]).items():
        assert torch.equal(again[name], value), name
