"""The Redis store's hot cache with a fake clock and no Redis: LRU bound, pending entries never
evicted, write-behind timing of the oldest pending step, generations guarding against stale reads."""

from __future__ import annotations

import pytest
import torch

from adapters.base import StateMeta, StreamState
from tta_server.state.base import StoredState, StreamKey, StreamRecord, VersionConflictError
from tta_server.state.redis.cache import MAX_AMBIGUOUS, HotCache
from tta_server.state.write_policy import WriteMode, WritePolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(sid: str) -> StreamRecord:
    return StreamRecord(StreamKey("t", sid), "m", "bn", {}, 0, created_at=1.0)


def stored(version: int) -> StoredState:
    return StoredState(
        StreamState({"x": torch.zeros(2)}, StateMeta("bn", {}, "h", step=version)), version, version, 0.0
    )


def test_lru_bound_evicts_least_recently_used_clean_entries_only() -> None:
    cache = HotCache(max_streams=2, clock=FakeClock())
    a = cache.remember(record("a"), "run-1")
    assert a is not None and a.epoch == "run-1"
    cache.confirm(a, stored(1), "tok", 1, "run-1")
    cache.stage(a, stored(2))  # a has a pending step now
    cache.remember(record("b"), None)
    cache.remember(record("c"), None)  # over the bound: b is the LRU clean entry, a is pending
    assert cache.get(StreamKey("t", "b")) is None and len(cache) == 2
    assert cache.get(StreamKey("t", "a")) is a and cache.pending_count() == 1
    cache.remember(record("d"), None)  # c is the only clean entry left to evict
    assert cache.get(StreamKey("t", "c")) is None and cache.get(StreamKey("t", "d")) is not None
    cache.forget(StreamKey("t", "a"), entry=cache.get(StreamKey("t", "d")))  # not a's entry: kept
    assert cache.get(StreamKey("t", "a")) is a
    cache.forget(StreamKey("t", "a"))
    assert cache.get(StreamKey("t", "a")) is None


def test_a_new_registration_of_the_same_id_replaces_the_entry_and_size_zero_disables() -> None:
    cache = HotCache(max_streams=5)
    first = cache.remember(record("a"), None)
    assert cache.remember(record("a"), None) is first
    newer = StreamRecord(StreamKey("t", "a"), "m", "bn", {}, 0, created_at=2.0)
    assert cache.remember(newer, None) is not first
    assert HotCache(max_streams=0).remember(record("a"), None) is None
    with pytest.raises(ValueError, match=">= 0"):
        HotCache(max_streams=-1)


def test_write_behind_is_due_after_n_steps_or_t_seconds_of_the_oldest_pending_step() -> None:
    clock = FakeClock()
    cache = HotCache(max_streams=10, clock=clock)
    policy = WritePolicy(WriteMode.WRITE_BEHIND, every_steps=3, every_seconds=5.0)
    key = StreamKey("t", "a")
    entry = cache.remember(record("a"), None)
    assert entry is not None
    cache.confirm(entry, None, "", 0, None)
    plan = cache.plan(entry, key, 0, policy)
    assert (plan.local, plan.base, plan.due) == (0, 0, False)
    clock.now = 10.0
    cache.stage(entry, stored(1))
    assert cache.due(policy, force=False) == []
    clock.now = 12.0
    cache.stage(entry, stored(2))
    # the age of the oldest pending step (10 s) counts, not the newest (12 s): due at 15 s
    with pytest.raises(VersionConflictError, match="version 2, write was based on 1"):
        cache.plan(entry, key, 1, policy)
    assert cache.plan(entry, key, 2, policy).due  # the third pending step
    assert cache.plan(entry, key, 2, policy).base == 0
    clock.now = 14.9
    assert cache.due(policy, force=False) == []
    assert cache.due(policy, force=True) == [(key, entry)]
    clock.now = 15.0
    assert cache.due(policy, force=False) == [(key, entry)]
    job = cache.flush_job(entry)
    assert job is not None and (job.stored.version, job.base, job.pending) == (2, 0, 2)
    cache.flushed(entry, job.stored, "tok", "run-1")
    assert entry.pending == 0 and entry.token == "tok"
    assert not cache.due(policy, force=True)  # clean: nothing pending, no dirty time
    assert cache.flush_job(entry) is None


def test_flush_of_an_older_state_keeps_newer_steps_pending_and_generations_guard_reads() -> None:
    clock = FakeClock()
    cache = HotCache(max_streams=10, clock=clock)
    entry = cache.remember(record("a"), None)
    assert entry is not None
    cache.confirm(entry, None, "", 0, None)
    cache.stage(entry, stored(1))
    job = cache.flush_job(entry)
    assert job is not None
    cache.stage(entry, stored(2))  # a step arrives while the flush is in flight
    cache.flushed(entry, job.stored, "tok", None)
    assert entry.persisted == 1 and entry.pending == 1 and entry.token == "" and entry.dirty_since == 0.0
    generation = entry.generation
    cache.stage(entry, stored(3))
    cache.confirm(entry, stored(1), "old", 1, None, generation)  # a slow read: ignored
    assert entry.stored is not None and entry.stored.version == 3
    for i in range(MAX_AMBIGUOUS + 3):
        cache.add_ambiguous(entry, f"t{i}")
    assert len(entry.ambiguous) == MAX_AMBIGUOUS and entry.ambiguous[-1] == f"t{MAX_AMBIGUOUS + 2}"
