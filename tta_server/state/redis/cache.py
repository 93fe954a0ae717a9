"""The hot cache of the Redis store: the newest state of recently used streams, as tensors.

Why a cache in front of Redis:

- A load asks Redis only "is (version, token) still current?"; the state bytes cross the
  network and are deserialized only when another replica wrote in between.
- Write-behind keeps unpersisted steps here until they are due (N steps or T seconds).
- During an outage the cached streams keep serving; their new states stay here, pending.

The cache is an LRU bounded by ``max_streams``, except that an entry with pending
(unpersisted) steps is never evicted: dropping it would lose acknowledged steps. Every update
of an entry goes through this class under one lock, and bumps the entry's ``generation`` so a
slow read from Redis never overwrites a newer entry. The clock (for the age of the oldest
pending step) is injectable.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from tta_server.state.base import StoredState, StreamKey, StreamRecord, VersionConflictError
from tta_server.state.write_policy import WritePolicy

MAX_AMBIGUOUS = 16
"""How many tokens of writes with an unknown outcome an entry remembers."""


@dataclass
class HotEntry:
    """One stream in the hot cache.

    ``stored`` is the newest state this process knows (valid when ``known``); ``persisted``
    the version Redis confirmed; the difference is the number of pending (unpersisted) steps.
    ``token`` identifies the write that produced ``stored`` in Redis, ``ambiguous`` the
    tokens of writes whose outcome was never learned (connection lost mid-call), and
    ``epoch`` the Redis ``run_id`` when the entry was last confirmed (a restart detector).
    ``generation`` changes with every update, so a slow read never overwrites a newer entry.
    ``io`` serializes the Redis writes of one stream.
    """

    record: StreamRecord
    stored: StoredState | None = None
    known: bool = False
    token: str = ""
    persisted: int = 0
    dirty_since: float | None = None
    ambiguous: list[str] = field(default_factory=list)
    epoch: str | None = None
    generation: int = 0
    io: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pending(self) -> int:
        """Steps of ``stored`` that Redis has not confirmed."""
        if not self.known or self.stored is None:
            return 0
        return self.stored.version - self.persisted


@dataclass(frozen=True)
class WritePlan:
    """What a state write has to do, decided from one consistent view of the entry.

    ``local`` is the cached version, ``base`` the version Redis must hold for the write to
    apply, ``due`` whether the write policy wants Redis written now.
    """

    local: int
    base: int
    due: bool


@dataclass(frozen=True)
class FlushJob:
    """A consistent copy of what :meth:`HotCache.flush_job` found pending for one entry."""

    stored: StoredState
    base: int
    pending: int
    accepted: list[str]


class HotCache:
    """Thread-safe LRU of :class:`HotEntry`; ``max_streams`` 0 disables it."""

    def __init__(self, max_streams: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_streams < 0:
            raise ValueError(f"hot cache size must be >= 0, got {max_streams}")
        self.max_streams = max_streams
        self._clock = clock
        self._entries: OrderedDict[StreamKey, HotEntry] = OrderedDict()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: StreamKey) -> HotEntry | None:
        """The entry of ``key`` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def remember(self, record: StreamRecord, epoch: str | None) -> HotEntry | None:
        """The entry of ``record`` (a new one if absent or registered differently); None when disabled."""
        if self.max_streams == 0:
            return None
        with self._lock:
            entry = self._entries.get(record.key)
            if entry is None or entry.record != record:
                entry = HotEntry(record)
                self._entries[record.key] = entry
            self._entries.move_to_end(record.key)
            entry.epoch = epoch
            self._evict()
            return entry

    def _evict(self) -> None:
        """Drop least recently used clean entries beyond the bound; pending entries are never dropped."""
        excess = len(self._entries) - self.max_streams
        if excess <= 0:
            return
        for key in [k for k, e in self._entries.items() if e.pending == 0][:excess]:
            del self._entries[key]

    def forget(self, key: StreamKey, entry: HotEntry | None = None) -> None:
        """Drop ``key``; with ``entry``, only if it is still that entry (not a newer registration)."""
        with self._lock:
            if entry is None or self._entries.get(key) is entry:
                self._entries.pop(key, None)

    def pending_count(self) -> int:
        """Streams whose newest state Redis has not confirmed."""
        with self._lock:
            return sum(1 for e in self._entries.values() if e.pending > 0)

    def due(self, policy: WritePolicy, force: bool) -> list[tuple[StreamKey, HotEntry]]:
        """Entries whose pending steps the write policy wants written now (all pending ones when ``force``)."""
        now = self._clock()
        with self._lock:
            return [
                (k, e)
                for k, e in self._entries.items()
                if e.pending > 0 and (force or policy.due(e.pending, e.dirty_since, now))
            ]

    def confirm(
        self,
        entry: HotEntry | None,
        stored: StoredState | None,
        token: str,
        persisted: int,
        epoch: str | None,
        generation: int | None = None,
    ) -> None:
        """Make ``entry`` a clean copy of what Redis holds, unless it changed since ``generation`` was read."""
        if entry is None:
            return
        with self._lock:
            if generation is not None and entry.generation != generation:
                return
            entry.stored, entry.token, entry.persisted, entry.known = stored, token, persisted, True
            entry.dirty_since = None
            entry.ambiguous.clear()
            entry.epoch = epoch
            entry.generation += 1

    def plan(self, entry: HotEntry, key: StreamKey, expected_version: int, policy: WritePolicy) -> WritePlan:
        """Decide a write of version ``expected_version + 1``; conflict if it is stale against pending steps."""
        now = self._clock()
        with self._lock:
            local = entry.stored.version if entry.stored is not None else 0
            dirty = entry.pending > 0
            if dirty and expected_version != local:
                raise VersionConflictError(
                    f"stream '{key.stream_id}' is at version {local}, write was based on {expected_version}"
                )
            base = entry.persisted if dirty else expected_version
            due = policy.due(expected_version + 1 - base, entry.dirty_since or now, now)
        return WritePlan(local, base, due)

    def stage(self, entry: HotEntry, new: StoredState) -> None:
        """Keep ``new`` as the entry's newest state, not yet in Redis (pending since now, or earlier)."""
        with self._lock:
            entry.stored = new
            entry.token = ""
            entry.dirty_since = entry.dirty_since or self._clock()
            entry.generation += 1

    def add_ambiguous(self, entry: HotEntry, token: str) -> None:
        """Remember ``token``: a write whose reply was lost may have been applied."""
        with self._lock:
            entry.ambiguous = [*entry.ambiguous, token][-MAX_AMBIGUOUS:]

    def flush_job(self, entry: HotEntry) -> FlushJob | None:
        """What a flush of ``entry`` must write now, or None when nothing is pending."""
        with self._lock:
            if entry.stored is None or entry.pending <= 0:
                return None
            return FlushJob(entry.stored, entry.persisted, entry.pending, list(entry.ambiguous))

    def flushed(self, entry: HotEntry, stored: StoredState, token: str, epoch: str | None) -> None:
        """Redis now holds ``stored`` (written with ``token``); newer local steps stay pending."""
        with self._lock:
            entry.persisted = stored.version
            entry.ambiguous.clear()
            entry.epoch = epoch
            if entry.stored is stored:
                entry.token, entry.dirty_since = token, None
            entry.generation += 1
