"""Values derived per registration object: computed once, again for another or a changed registration."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import replace

from tta_server.app import group_key
from tta_server.serving.record_cache import RecordCache
from tta_server.state.base import StreamKey, StreamRecord


def record(sid: str, config: dict[str, float]) -> StreamRecord:
    return StreamRecord(StreamKey("t", sid), "resnet20", "alpha_bn", config, 0)


def test_derived_once_per_registration_object() -> None:
    calls: list[str] = []

    def derive(r: StreamRecord) -> Hashable:
        calls.append(r.key.stream_id)
        return group_key(r)

    cache = RecordCache(derive)
    a, b = record("a", {"alpha": 0.1}), record("b", {"alpha": 0.1})
    assert cache(a) == cache(a) == cache(b)  # same model, method and config: one fusion group
    assert calls == ["a", "b"]
    changed = replace(a, config={"alpha": 0.2})
    assert cache(changed) != cache(a)
    assert calls == ["a", "b", "a"]


def test_bounded_and_never_confused_by_a_reused_id() -> None:
    cache = RecordCache(lambda r: r.key.stream_id, size=2)
    records = [record(str(i), {}) for i in range(5)]
    assert [cache(r) for r in records] == ["0", "1", "2", "3", "4"]
    assert len(cache._by_id) <= 2
    for i in range(50):  # short-lived registrations whose ids Python may reuse
        assert cache(record(f"n{i}", {})) == f"n{i}"
