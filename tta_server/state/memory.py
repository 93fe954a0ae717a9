"""The embedded in-process state store (the default): a bounded LRU with an idle TTL.

States are kept as objects (no serialization), so the hot path costs a dict lookup. The
bound protects the process: when ``max_streams`` is exceeded the least recently used stream
is dropped, and a stream idle for longer than ``ttl_seconds`` expires. Both are data loss for
that stream (it answers 404 afterwards), which is why replicas and restarts need the Redis
store; so neither is silent: each is logged as a warning naming the stream and the reason,
and reported to ``on_evict`` (the server counts it as ``tta_streams_evicted_total{reason}``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from adapters.base import StreamState
from tta_server.state.base import (
    StateSummary,
    StoredState,
    StreamExistsError,
    StreamKey,
    StreamNotFoundError,
    StreamRecord,
    VersionConflictError,
)

log = logging.getLogger(__name__)

EvictionReason = Literal["lru", "ttl"]
"""Why a stream was dropped: ``lru`` over ``max_streams``, ``ttl`` idle past ``ttl_seconds``."""


@dataclass
class _Entry:
    record: StreamRecord
    stored: StoredState | None
    last_access: float


class MemoryStateStore:
    """Thread-safe in-process store with LRU eviction and idle expiry."""

    name = "memory"
    in_process = True

    def __init__(
        self,
        max_streams: int = 10_000,
        ttl_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[StreamKey, EvictionReason], None] | None = None,
    ) -> None:
        """``on_evict`` is called for every dropped stream, under the store's lock: it must be quick
        and must not call the store (the server's increments a counter)."""
        self.max_streams = max_streams
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._on_evict = on_evict
        self._entries: OrderedDict[StreamKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def ping(self) -> None:
        """An in-process store always answers."""

    def close(self) -> None:
        """Nothing to release."""

    def _expire(self, now: float) -> None:
        if self.ttl_seconds is None:
            return
        # the entries are in least-recently-used order (every touch moves its entry to the end, with the
        # time of that touch), so the stale ones lead: only they are visited, not every stream on every call
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.last_access <= self.ttl_seconds:
                return
            del self._entries[key]
            self._evicted(key, "ttl")

    def _evicted(self, key: StreamKey, reason: EvictionReason) -> None:
        self.evictions += 1
        if reason == "ttl":
            why = f"idle for more than {self.ttl_seconds:g} s (memory_ttl_s)"
        else:
            why = f"least recently used beyond {self.max_streams} streams (memory_max_streams)"
        log.warning("memory store dropped stream %s/%s and its state (%s): %s", key.tenant, key.stream_id, reason, why)
        if self._on_evict is not None:
            self._on_evict(key, reason)

    def _touch(self, key: StreamKey) -> _Entry:
        now = self._clock()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is None:
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")
        entry.last_access = now
        self._entries.move_to_end(key)
        return entry

    def create_stream(self, record: StreamRecord) -> None:
        with self._lock:
            now = self._clock()
            self._expire(now)
            if record.key in self._entries:
                raise StreamExistsError(f"stream '{record.key.stream_id}' already exists")
            self._entries[record.key] = _Entry(record, None, now)
            while len(self._entries) > self.max_streams:
                evicted, _ = self._entries.popitem(last=False)
                self._evicted(evicted, "lru")

    def get_stream(self, key: StreamKey) -> StreamRecord:
        with self._lock:
            return self._touch(key).record

    def list_streams(self, tenant: str | None, offset: int, limit: int) -> tuple[list[StreamRecord], int]:
        with self._lock:
            self._expire(self._clock())
            records = sorted(
                (e.record for k, e in self._entries.items() if tenant is None or k.tenant == tenant),
                key=lambda r: (r.created_at, str(r.key)),
            )
        return records[offset : offset + limit], len(records)

    def delete_stream(self, key: StreamKey) -> None:
        with self._lock:
            self._touch(key)
            del self._entries[key]

    def load_state(self, key: StreamKey) -> StoredState | None:
        with self._lock:
            return self._touch(key).stored

    def save_state(self, key: StreamKey, state: StreamState, expected_version: int, samples_seen: int) -> int:
        with self._lock:
            entry = self._touch(key)
            current = entry.stored.version if entry.stored else 0
            if current != expected_version:
                raise VersionConflictError(
                    f"stream '{key.stream_id}' is at version {current}, write was based on {expected_version}"
                )
            entry.stored = StoredState(state, current + 1, samples_seen, time.time())
            return current + 1

    def state_summaries(self, keys: Sequence[StreamKey]) -> dict[StreamKey, StateSummary]:
        """Read without touching: describing a stream is not using it (no LRU or idle refresh)."""
        with self._lock:
            self._expire(self._clock())
            entries = {key: self._entries.get(key) for key in keys}
        return {k: StateSummary.of(e.stored) for k, e in entries.items() if e is not None and e.stored is not None}

    def count(self) -> int:
        """Live streams: expired ones are dropped (and reported) first, so the gauge never counts them."""
        with self._lock:
            self._expire(self._clock())
            return len(self._entries)
