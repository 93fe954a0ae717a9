"""Listing indexes of the Redis store, and the stream count served without waiting for Redis.

Streams are listed from sorted sets scored by creation time (``{idx}:all`` and one per
tenant), so a page is one ZRANGE and the total one ZCARD. With an idle TTL the registration
keys expire on their own but index members do not: ``{idx}:exp`` holds a hint of when each
member may have expired, and :meth:`ListingIndexes.prune` drops members whose keys are gone,
bounded per call so a listing never turns into a scan of everything.

On a Redis Cluster the tenant indexes live in slots of their own
(:attr:`KeyLayout.tenant_index_shares_slot` is False): the all-tenants and expiry indexes still
change in one MULTI, and the tenant index is written right after it (added after, removed
after). A crash in between leaves at worst a tenant member whose registration is gone, which
that tenant's listing prunes like any other dangling member.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import redis

from tta_server.state.base import StreamKey, StreamRecord
from tta_server.state.redis.keys import KeyLayout, key_of_member, member_of, record_from_json

LIST_ROUNDS = 8
"""A page skips dangling members (expired or half-registered streams) for at most this many rounds."""
PRUNE_BATCH = 500
"""Expiry hints examined per prune."""


class ListingIndexes:
    """Add, remove, page through and prune the listing indexes of one key layout."""

    def __init__(
        self,
        client: redis.Redis,
        keys: KeyLayout,
        ttl_seconds: float | None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self._wall_clock = wall_clock

    def has(self, key: StreamKey) -> bool:
        """True when ``key`` has a member in the all-tenants index (perhaps a dangling one)."""
        return self.client.zscore(self.keys.all_index, member_of(key)) is not None

    def add(self, record: StreamRecord) -> None:
        """Add a stream to the listing indexes, keeping an existing member's creation time."""
        member = member_of(record.key)
        tenant_index = self.keys.tenant_index(record.key.tenant)
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(self.keys.all_index, {member: record.created_at}, nx=True)
        if self.keys.tenant_index_shares_slot:
            pipe.zadd(tenant_index, {member: record.created_at}, nx=True)
        if self.ttl_seconds:
            pipe.zadd(self.keys.expiry_index, {member: self._wall_clock() + self.ttl_seconds}, nx=True)
        pipe.execute()
        if not self.keys.tenant_index_shares_slot:
            self.client.zadd(tenant_index, {member: record.created_at}, nx=True)

    def reindex(self, record: StreamRecord) -> None:
        """Correct the creation time of a member left behind by an expired or crashed stream of the same id."""
        member = member_of(record.key)
        pipe = self.client.pipeline(transaction=self.keys.tenant_index_shares_slot)
        pipe.zadd(self.keys.all_index, {member: record.created_at}, xx=True)
        pipe.zadd(self.keys.tenant_index(record.key.tenant), {member: record.created_at}, xx=True)
        pipe.execute()

    def remove(self, members: Sequence[bytes | str]) -> int:
        """Remove ``members`` from every index; returns how many were in the all-tenants index."""
        if not members:
            return 0
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.keys.all_index, *members)
        pipe.zrem(self.keys.expiry_index, *members)
        shared = self.keys.tenant_index_shares_slot
        tenants = pipe if shared else self.client.pipeline(transaction=False)
        for member in members:
            tenants.zrem(self.keys.tenant_index(key_of_member(member).tenant), member)
        removed = int(pipe.execute()[0])
        if not shared:
            tenants.execute()
        return removed

    def page(self, tenant: str | None, offset: int, limit: int) -> tuple[list[StreamRecord], int]:
        """A page ordered by creation time (then tenant/id) and the total; drops dangling members it meets."""
        index = self.keys.all_index if tenant is None else self.keys.tenant_index(tenant)
        records: list[StreamRecord] = []
        self.prune()
        position = offset
        for _ in range(LIST_ROUNDS):
            wanted = limit - len(records)
            if wanted <= 0:
                break
            members = cast(list[bytes], self.client.zrange(index, position, position + wanted - 1))
            if not members:
                break
            pipe = self.client.pipeline(transaction=False)
            for member in members:
                pipe.get(self.keys.record(key_of_member(member)))
            raws = pipe.execute()
            dangling = [m for m, raw in zip(members, raws, strict=True) if raw is None]
            records.extend(record_from_json(raw) for raw in raws if raw is not None)
            position += len(members) - len(dangling)
            self.remove(dangling)
            if not dangling and len(members) < wanted:
                break
        return records, int(self.client.zcard(index))

    def total(self) -> int:
        """Registered streams of all tenants (after a prune)."""
        self.prune()
        return int(self.client.zcard(self.keys.all_index))

    def prune(self) -> None:
        """Drop index members of streams whose keys expired (idle TTL); bounded per call."""
        if not self.ttl_seconds:
            return
        now = self._wall_clock()
        due = cast(
            list[bytes], self.client.zrangebyscore(self.keys.expiry_index, "-inf", now, start=0, num=PRUNE_BATCH)
        )
        if not due:
            return
        pipe = self.client.pipeline(transaction=False)
        for member in due:
            pipe.pttl(self.keys.record(key_of_member(member)))
        ttls = pipe.execute()
        gone = [m for m, ttl in zip(due, ttls, strict=True) if ttl == -2]
        alive = {m: now + ttl / 1000 for m, ttl in zip(due, ttls, strict=True) if ttl >= 0}
        forever = [m for m, ttl in zip(due, ttls, strict=True) if ttl == -1]
        if alive:
            self.client.zadd(self.keys.expiry_index, alive, xx=True)
        if forever:
            self.client.zrem(self.keys.expiry_index, *forever)
        self.remove(gone)


class StreamCount:
    """The number of registered streams, read by a background thread and adjusted locally.

    ``count()`` feeds a gauge and must never wait for Redis, so it returns this value. A
    refresh reads the total from Redis and :meth:`offer` s it; a registration or deletion of
    this process adjusts the value inside a :meth:`mutation`. A refresh that overlapped a
    mutation is discarded (its read may or may not include the mutation), so a local
    adjustment is never lost or counted twice; the next refresh picks up other replicas' changes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0
        self._completed = 0
        self._active = 0

    @property
    def value(self) -> int:
        return self._value

    def snapshot(self) -> int | None:
        """Call before reading the total; None when a mutation is under way (the read would be discarded)."""
        with self._lock:
            return None if self._active else self._completed

    def offer(self, snapshot: int | None, total: int) -> bool:
        """Accept ``total`` read after ``snapshot`` unless a mutation overlapped the read; True when accepted."""
        with self._lock:
            if snapshot is None or self._active or snapshot != self._completed:
                return False
            self._value = total
            return True

    @contextmanager
    def mutation(self) -> Iterator[StreamCount]:
        """Bracket a change of the indexes; call :meth:`adjust` inside it once the change is made."""
        with self._lock:
            self._active += 1
        try:
            yield self
        finally:
            with self._lock:
                self._active -= 1
                self._completed += 1

    def adjust(self, delta: int) -> None:
        """Apply this process's own change (``+1`` registered, ``-1`` deleted) at once."""
        with self._lock:
            self._value = max(0, self._value + delta)
