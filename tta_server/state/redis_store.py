"""The Redis state store: registrations and states shared by replicas, with a hot cache.

Why it looks the way it does:

- **No lost updates.** Every state write names the version it was based on and runs as one
  Lua script that compares and sets (:data:`SAVE_SCRIPT`). A stale write is refused with
  :class:`VersionConflictError`; the runner then reloads and recomputes the step. Each write
  also carries a random token, so a write whose reply was lost (and which redis-py retried) is
  recognised as already applied instead of being reported as a conflict.
- **Hot cache.** The newest state of recently used streams stays in process memory as
  tensors. A load asks Redis only "is (version, token) still current?"; the state bytes
  cross the network and are deserialized only when another replica wrote in between.
  Entries are dropped on every conflict, so a reload after a conflict reads fresh from Redis.
- **Write policy** (:mod:`tta_server.state.write_policy`): write-through by default;
  write-behind keeps steps in the cache and flushes every N steps / T seconds and on
  :meth:`RedisStateStore.close`.
- **Outages.** When Redis stops answering, a circuit opens: streams in the hot cache keep
  serving and their new states stay pending in memory (each counted as a failed write); a
  background thread probes Redis and, when it answers again, writes every pending state
  with a compare-and-set against the last version Redis confirmed. If Redis came back empty
  (restarted without persistence: a new ``run_id``), this replica re-registers the streams it
  holds and writes their states, so nothing it acknowledged is lost. Operations that need
  Redis itself (registering, listing, deleting) answer :class:`StoreUnavailableError` (503).

Key layout and hash tags: :mod:`tta_server.state.redis_keys`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from adapters.base import StreamState
from adapters.serialize import state_from_bytes, state_to_bytes
from tta_server.metrics import Metrics
from tta_server.state.base import (
    StateSummary,
    StoredState,
    StoreUnavailableError,
    StreamExistsError,
    StreamKey,
    StreamNotFoundError,
    StreamRecord,
    VersionConflictError,
)
from tta_server.state.redis_keys import KeyLayout, key_of_member, member_of, record_from_json, record_to_json
from tta_server.state.write_policy import WritePolicy

log = logging.getLogger(__name__)

# Reply codes of SAVE_SCRIPT.
_MISSING, _WRITTEN, _CONFLICT, _RESTORED = 0, 1, 2, 3
# Reply codes of LOAD_SCRIPT.
_L_MISSING, _L_EMPTY, _L_SAME, _L_NEW = 0, 1, 2, 3

SAVE_SCRIPT = """
-- KEYS: record, state. ARGV: base version, new version, token, blob, samples, updated_at,
-- step, ttl ms (0 = none), record JSON to restore ('' = never), accepted earlier tokens...
local restored = false
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[9] == '' then return {0, 0} end
  redis.call('SET', KEYS[1], ARGV[9])
  redis.call('DEL', KEYS[2])
  restored = true
end
local cur = tonumber(redis.call('HGET', KEYS[2], 'v') or '0')
local tok = redis.call('HGET', KEYS[2], 'w') or ''
if not restored then
  if cur == tonumber(ARGV[2]) and tok == ARGV[3] then
    return {1, cur}
  end
  local ok = cur == tonumber(ARGV[1])
  if not ok and tok ~= '' then
    for i = 10, #ARGV do
      if tok == ARGV[i] then ok = true break end
    end
  end
  if not ok then return {2, cur} end
end
redis.call('HSET', KEYS[2], 'v', ARGV[2], 'b', ARGV[4], 'n', ARGV[5], 'u', ARGV[6], 's', ARGV[7], 'w', ARGV[3])
local ttl = tonumber(ARGV[8])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
if restored then return {3, tonumber(ARGV[2])} end
return {1, tonumber(ARGV[2])}
"""
"""Compare-and-set of one stream's state (both keys share the stream's hash tag).

Applied when the stored version equals the base version, or when the stored write is one of
this replica's own earlier writes whose outcome it never learned (accepted tokens). Replies
``{code, version}`` with code 0 missing stream, 1 written, 2 conflict, 3 restored."""

LOAD_SCRIPT = """
-- KEYS: record, state. ARGV: cached version (-1 = none), cached token, ttl ms (0 = none).
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
local f = redis.call('HMGET', KEYS[2], 'v', 'w')
if not f[1] then return {1} end
if tonumber(f[1]) == tonumber(ARGV[1]) and f[2] == ARGV[2] then return {2, f[1]} end
local g = redis.call('HMGET', KEYS[2], 'b', 'n', 'u')
return {3, f[1], f[2], g[1], g[2], g[3]}
"""
"""Load a state unless the caller's cached (version, token) is still current; refreshes the idle TTL."""

CREATE_SCRIPT = """
-- KEYS: record, state. ARGV: record JSON, ttl ms (0 = none).
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('DEL', KEYS[2])
  local ttl = tonumber(ARGV[2])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  return 1
end
return 0
"""
"""Register a stream if its id is free, clearing any state left by an earlier stream of that id."""

_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError)
_MAX_AMBIGUOUS = 16
_LIST_ROUNDS = 8
_PRUNE_BATCH = 500


@dataclass
class _Hot:
    """One stream in the hot cache.

    ``stored`` is the newest state this process knows (valid when ``known``); ``persisted``
    the version Redis confirmed; the difference is the number of pending (unpersisted) steps.
    ``token`` identifies the write that produced ``stored`` in Redis, ``ambiguous`` the
    tokens of writes whose outcome was never learned (connection lost mid-call), and
    ``epoch`` the Redis ``run_id`` when the entry was last confirmed (a restart detector).
    ``generation`` changes with every update, so a slow read never overwrites a newer entry.
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
        if not self.known or self.stored is None:
            return 0
        return self.stored.version - self.persisted


def redacted_location(client: redis.Redis) -> str:
    """``host:port/db`` (or the socket path) of the server, never the credentials."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class RedisStateStore:
    """The :class:`~tta_server.state.base.StateStore` backed by Redis; thread-safe."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "tta",
        ttl_seconds: float | None = None,
        policy: WritePolicy | None = None,
        cache_max_streams: int = 1000,
        max_connections: int = 32,
        socket_timeout: float = 2.0,
        retry_interval: float = 1.0,
        device: str | None = None,
        metrics: Metrics | None = None,
        client_name: str = "tta-server",
    ) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"not a Redis URL: {url.rsplit('@', maxsplit=1)[-1]!r} (use redis:// or rediss://)")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"Redis idle TTL must be positive, got {ttl_seconds}")
        if cache_max_streams < 0:
            raise ValueError(f"hot cache size must be >= 0, got {cache_max_streams}")
        self.keys = KeyLayout(key_prefix)
        self.ttl_seconds = ttl_seconds
        self.policy = policy or WritePolicy()
        self.cache_max_streams = cache_max_streams
        self.retry_interval = retry_interval
        self.device = device
        self.metrics = metrics
        # One pool per store, shared by every thread. One retry per command hides a pooled
        # connection that died (Redis restarted); the write token makes retried writes safe.
        self.client: redis.Redis = redis.Redis.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
            client_name=client_name,
        )
        self.where = redacted_location(self.client)
        self._save = self.client.register_script(SAVE_SCRIPT)
        self._load = self.client.register_script(LOAD_SCRIPT)
        self._create = self.client.register_script(CREATE_SCRIPT)
        self._cache: OrderedDict[StreamKey, _Hot] = OrderedDict()
        self._lock = threading.RLock()
        self._down_since: float | None = None
        self._last_probe = 0.0
        self._run_id: str | None = None
        self._last_count = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._closed = False
        if metrics is not None:
            metrics.track_gauge(metrics.store_pending_states, self.pending_states)
        self._flusher = threading.Thread(target=self._flush_loop, name="redis-state-flusher", daemon=True)
        self._flusher.start()

    # -- health ---------------------------------------------------------------------------
    @property
    def ttl_ms(self) -> int:
        return int(self.ttl_seconds * 1000) if self.ttl_seconds else 0

    @property
    def down(self) -> bool:
        """True while the circuit is open (the last Redis call failed and no probe succeeded)."""
        return self._down_since is not None

    def ping(self) -> None:
        """PING Redis; raises :class:`StoreUnavailableError` when it does not answer.

        While the circuit is open this answers at once from the background prober's last
        result, so a readiness probe never waits for socket timeouts during a partition.
        """
        since = self._down_since
        if since is not None:
            raise StoreUnavailableError(
                f"Redis at {self.where} unreachable for {time.monotonic() - since:.0f}s "
                f"(probed every {self.retry_interval:g}s)"
            )
        try:
            self.client.ping()
        except redis.RedisError as exc:
            self._mark_down(exc)
            raise StoreUnavailableError(f"Redis at {self.where} does not answer: {exc}") from exc
        self._mark_up()

    def pending_states(self) -> int:
        """Streams whose newest state is not yet in Redis (a gauge)."""
        with self._lock:
            return sum(1 for e in self._cache.values() if e.pending > 0)

    def degradation(self) -> str | None:
        """Why readiness should say ``degraded`` (Redis down, or an outage's backlog), else None."""
        pending = self.pending_states()
        since = self._down_since
        if since is not None:
            return (
                f"Redis at {self.where} unreachable for {time.monotonic() - since:.0f}s: serving "
                f"{len(self._cache)} cached streams from memory, {pending} states not yet persisted"
            )
        if pending and self.policy.write_through:
            return f"{pending} stream states not yet written to Redis at {self.where} (catching up)"
        return None

    def _mark_down(self, exc: BaseException) -> bool:
        """Open the circuit when ``exc`` says Redis is unreachable; True when it did."""
        if not isinstance(exc, _OUTAGE_ERRORS):
            return False
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._last_probe = self._down_since
                log.warning("Redis at %s unreachable (%s): serving from the hot cache", self.where, exc)
        return True

    def _mark_up(self) -> None:
        with self._lock:
            was_down = self._down_since
            self._down_since = None
        if was_down is not None:
            try:
                self._refresh_run_id()
            except redis.RedisError:
                self._run_id = None
            log.warning(
                "Redis at %s answers again after %.1fs; writing %d pending states",
                self.where,
                time.monotonic() - was_down,
                self.pending_states(),
            )
            self._wake.set()

    def _refresh_run_id(self) -> str | None:
        """The server's ``run_id`` (changes on every restart); None when INFO is not allowed."""
        try:
            info = self.client.info("server")
        except redis.ResponseError:
            return None
        run_id = info.get("run_id")
        self._run_id = str(run_id) if run_id else None
        return self._run_id

    def _epoch(self) -> str | None:
        if self._run_id is None:
            try:
                self._refresh_run_id()
            except redis.RedisError:
                return None
        return self._run_id

    def _restarted_since(self, entry: _Hot) -> bool:
        """True when Redis restarted (new run_id) since ``entry`` was last confirmed: data was lost, not deleted."""
        if entry.epoch is None:
            return False
        try:
            current = self._refresh_run_id()
        except redis.RedisError:
            return False
        return current is not None and current != entry.epoch

    def _count_error(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(operation).inc()

    def _unavailable(self, action: str, exc: BaseException) -> StoreUnavailableError:
        """The 503 error for ``action``, saying whether Redis is unreachable or refused the command."""
        if self._mark_down(exc):
            return StoreUnavailableError(f"cannot {action}: Redis at {self.where} is unreachable ({exc})")
        return StoreUnavailableError(f"cannot {action}: Redis at {self.where} answered with an error ({exc})")

    # -- hot cache ------------------------------------------------------------------------
    def _cached(self, key: StreamKey) -> _Hot | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
            return entry

    def _remember(self, record: StreamRecord) -> _Hot | None:
        """The cache entry of ``record`` (a new one if absent or registered differently)."""
        if self.cache_max_streams == 0:
            return None
        with self._lock:
            entry = self._cache.get(record.key)
            if entry is None or entry.record != record:
                entry = _Hot(record)
                self._cache[record.key] = entry
            self._cache.move_to_end(record.key)
            entry.epoch = self._run_id
            self._evict()
            return entry

    def _evict(self) -> None:
        """Drop least recently used clean entries beyond the bound; pending entries are never dropped."""
        excess = len(self._cache) - self.cache_max_streams
        if excess <= 0:
            return
        for key in [k for k, e in self._cache.items() if e.pending == 0][:excess]:
            del self._cache[key]

    def _forget(self, key: StreamKey, entry: _Hot | None = None) -> None:
        with self._lock:
            if entry is None or self._cache.get(key) is entry:
                self._cache.pop(key, None)

    # -- registry -------------------------------------------------------------------------
    def _index(self, record: StreamRecord) -> None:
        """Add a stream to the listing indexes, keeping an existing member's creation time."""
        member = member_of(record.key)
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(self.keys.all_index, {member: record.created_at}, nx=True)
        pipe.zadd(self.keys.tenant_index(record.key.tenant), {member: record.created_at}, nx=True)
        if self.ttl_seconds:
            pipe.zadd(self.keys.expiry_index, {member: time.time() + self.ttl_seconds}, nx=True)
        pipe.execute()

    def _reindex(self, record: StreamRecord) -> None:
        """Correct the creation time of a member left behind by an expired or crashed stream of the same id."""
        member = member_of(record.key)
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(self.keys.all_index, {member: record.created_at}, xx=True)
        pipe.zadd(self.keys.tenant_index(record.key.tenant), {member: record.created_at}, xx=True)
        pipe.execute()

    def _unindex(self, members: Sequence[bytes | str]) -> None:
        if not members:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.keys.all_index, *members)
        pipe.zrem(self.keys.expiry_index, *members)
        for member in members:
            pipe.zrem(self.keys.tenant_index(key_of_member(member).tenant), member)
        pipe.execute()

    def create_stream(self, record: StreamRecord) -> None:
        """Register ``record``: index first (NX), then the registration (NX); 409 when the id is taken.

        Indexing first means a crash in between leaves an index member without a record,
        which listing prunes, never a stream that exists but cannot be listed.
        """
        key = record.key
        try:
            had_member = self.client.zscore(self.keys.all_index, member_of(key)) is not None
            self._index(record)
            created = self._create(
                keys=[self.keys.record(key), self.keys.state(key)], args=[record_to_json(record), self.ttl_ms]
            )
            if not created:
                raise StreamExistsError(f"stream '{key.stream_id}' already exists")
            if had_member:
                self._reindex(record)
            self._epoch()
        except redis.RedisError as exc:
            self._count_error("create_stream")
            raise self._unavailable(f"register stream '{key.stream_id}'", exc) from exc
        self._mark_up()
        self._confirm(self._remember(record), None, "", 0)

    def get_stream(self, key: StreamKey) -> StreamRecord:
        """The registration, read from Redis (refreshing the idle TTL), or from the cache while Redis is down."""
        entry = self._cached(key)
        if self.down:
            if entry is not None:
                return entry.record
            raise StoreUnavailableError(
                f"Redis at {self.where} is unreachable and stream '{key.stream_id}' is not in this replica's hot cache"
            )
        try:
            if self.ttl_ms:
                pipe = self.client.pipeline(transaction=True)
                pipe.getex(self.keys.record(key), px=self.ttl_ms)
                pipe.pexpire(self.keys.state(key), self.ttl_ms)
                raw = pipe.execute()[0]
            else:
                raw = self.client.get(self.keys.record(key))
        except redis.RedisError as exc:
            self._count_error("get_stream")
            if self._mark_down(exc) and entry is not None:
                return entry.record
            raise self._unavailable(f"read stream '{key.stream_id}'", exc) from exc
        if raw is None:
            if entry is not None and self._restore(entry):
                return entry.record
            self._forget(key)
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")
        record = record_from_json(raw)
        if record.key != key:
            raise ValueError(f"Redis key {self.keys.record(key)} holds the registration of {record.key}")
        self._epoch()
        self._remember(record)
        return record

    def list_streams(self, tenant: str | None, offset: int, limit: int) -> tuple[list[StreamRecord], int]:
        """A page ordered by creation time (then tenant/id), and the total, from the sorted-set indexes."""
        index = self.keys.all_index if tenant is None else self.keys.tenant_index(tenant)
        records: list[StreamRecord] = []
        try:
            self._prune()
            position = offset
            for _ in range(_LIST_ROUNDS):
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
                self._unindex(dangling)
                if not dangling and len(members) < wanted:
                    break
            total = int(self.client.zcard(index))
        except redis.RedisError as exc:
            self._count_error("list_streams")
            raise self._unavailable("list streams", exc) from exc
        self._mark_up()
        return records, total

    def _prune(self) -> None:
        """Drop index members of streams whose keys expired (idle TTL); bounded per call."""
        if not self.ttl_seconds:
            return
        now = time.time()
        due = cast(
            list[bytes], self.client.zrangebyscore(self.keys.expiry_index, "-inf", now, start=0, num=_PRUNE_BATCH)
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
        self._unindex(gone)

    def delete_stream(self, key: StreamKey) -> None:
        """Remove registration, state and index members; 404 when Redis had no registration."""
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.exists(self.keys.record(key))
            pipe.delete(self.keys.record(key), self.keys.state(key))
            existed = bool(pipe.execute()[0])
            self._unindex([member_of(key)])
        except redis.RedisError as exc:
            self._count_error("delete_stream")
            raise self._unavailable(f"delete stream '{key.stream_id}'", exc) from exc
        self._mark_up()
        self._forget(key)
        if not existed:
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")

    def count(self) -> int:
        """Registered streams (all tenants); while Redis is down, the last count read (a gauge must not fail)."""
        try:
            self._prune()
            self._last_count = int(self.client.zcard(self.keys.all_index))
        except redis.RedisError as exc:
            self._mark_down(exc)
            log.debug("stream count unavailable, reporting the last one: %s", exc)
        return self._last_count

    # -- state ----------------------------------------------------------------------------
    def _cache_is_authoritative(self, entry: _Hot | None) -> TypeGuard[_Hot]:
        """The cached state is the newest one can get: it holds unpersisted steps, or Redis is down."""
        return entry is not None and entry.known and (entry.pending > 0 or self.down)

    def load_state(self, key: StreamKey) -> StoredState | None:
        """The newest state: from the cache when it holds unpersisted steps or Redis is down,
        else from Redis (only the version and token cross the network when the cache is current)."""
        entry = self._cached(key)
        if self._cache_is_authoritative(entry):
            return entry.stored
        if self.down:
            raise StoreUnavailableError(
                f"Redis at {self.where} is unreachable and the state of stream '{key.stream_id}' "
                "is not in this replica's hot cache"
            )
        generation = entry.generation if entry is not None else 0
        cached = entry.stored if entry is not None and entry.known else None
        known_version, known_token = (cached.version, entry.token) if cached is not None and entry else (-1, "")
        try:
            reply = cast(
                list[Any],
                self._load(
                    keys=[self.keys.record(key), self.keys.state(key)],
                    args=[known_version, known_token, self.ttl_ms],
                ),
            )
        except redis.RedisError as exc:
            self._count_error("load_state")
            if self._mark_down(exc) and entry is not None and entry.known:
                return entry.stored
            raise self._unavailable(f"load the state of stream '{key.stream_id}'", exc) from exc
        code = int(reply[0])
        if code == _L_MISSING:
            if entry is not None and self._restore(entry):
                return entry.stored
            self._forget(key)
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")
        if code == _L_EMPTY:
            self._confirm(entry, None, "", 0, generation)
            return None
        if code == _L_SAME and cached is not None:
            self._confirm(entry, cached, known_token, cached.version, generation)
            return cached
        version, token = int(reply[1]), _text(reply[2])
        state = state_from_bytes(bytes(reply[3]), device=self.device)
        stored = StoredState(state, version, int(reply[4]), float(reply[5]))
        self._confirm(entry, stored, token, version, generation)
        return stored

    def state_summaries(self, keys: Sequence[StreamKey]) -> dict[StreamKey, StateSummary]:
        """Summaries from the hot cache where it holds unpersisted steps, else one pipelined read of
        each state's small fields (the blob's length, never the blob); does not refresh idle TTLs."""
        out: dict[StreamKey, StateSummary] = {}
        remote: list[StreamKey] = []
        for key in keys:
            entry = self._cached(key)
            if self._cache_is_authoritative(entry):
                if entry.stored is not None:
                    out[key] = StateSummary.of(entry.stored)
            else:
                remote.append(key)
        if not remote:
            return out
        if self.down:
            raise StoreUnavailableError(f"Redis at {self.where} is unreachable: cannot describe stream states")
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in remote:
                pipe.hmget(self.keys.state(key), ["v", "s", "n", "u"])
                pipe.hstrlen(self.keys.state(key), "b")
            replies = pipe.execute()
        except redis.RedisError as exc:
            self._count_error("state_summaries")
            raise self._unavailable("describe stream states", exc) from exc
        for i, key in enumerate(remote):
            fields, size = cast(list[bytes | None], replies[2 * i]), int(replies[2 * i + 1])
            if fields[0] is None:
                continue
            version, step, samples, updated = (_text(f) for f in fields)
            out[key] = StateSummary(int(version), int(step or 0), int(samples or 0), float(updated or 0.0), size)
        return out

    def _confirm(
        self,
        entry: _Hot | None,
        stored: StoredState | None,
        token: str,
        persisted: int,
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
            entry.epoch = self._run_id
            entry.generation += 1

    def save_state(self, key: StreamKey, state: StreamState, expected_version: int, samples_seen: int) -> int:
        """Compare-and-set ``state`` on ``expected_version``; returns the new version.

        Write-through writes to Redis now; write-behind keeps the step in the cache until it is
        due. While Redis is down a cached stream's step is accepted into the cache (counted as
        a failed write) and written when Redis answers again.
        """
        new = StoredState(state, expected_version + 1, samples_seen, time.time())
        entry = self._cached(key)
        if entry is None or not entry.known:
            return self._save_uncached(key, entry, new, expected_version)
        with entry.io:
            now = time.monotonic()
            with self._lock:
                local = entry.stored.version if entry.stored is not None else 0
                dirty = entry.pending > 0
                if dirty and expected_version != local:
                    raise VersionConflictError(
                        f"stream '{key.stream_id}' is at version {local}, write was based on {expected_version}"
                    )
                base = entry.persisted if dirty else expected_version
                due = self.policy.due(new.version - base, entry.dirty_since or now, now)
            if due and not self.down:
                token = uuid.uuid4().hex
                try:
                    code, current = self._write(key, entry.record, new, base, token, list(entry.ambiguous), False)
                except redis.RedisError as exc:
                    self._count_error("save_state")
                    if not self._mark_down(exc):
                        raise self._unavailable(f"save the state of stream '{key.stream_id}'", exc) from exc
                    with self._lock:
                        entry.ambiguous = [*entry.ambiguous, token][-_MAX_AMBIGUOUS:]
                else:
                    return self._after_write(key, entry, new, token, (code, current), base)
            elif due:
                self._count_error("save_state")
            if expected_version != local:
                # The cache is this write's only reference now, and the write was not based on it.
                raise VersionConflictError(
                    f"stream '{key.stream_id}' is at version {local}, write was based on {expected_version}"
                )
            with self._lock:
                entry.stored = new
                entry.token = ""
                entry.dirty_since = entry.dirty_since or now
                entry.generation += 1
            return new.version

    def _after_write(
        self, key: StreamKey, entry: _Hot, new: StoredState, token: str, reply: tuple[int, int], base: int
    ) -> int:
        """Apply the outcome of a write made by :meth:`save_state` (called with ``entry.io`` held)."""
        code, current = reply
        if code in (_WRITTEN, _RESTORED):
            if code == _RESTORED:
                self._index(entry.record)
            self._confirm(entry, new, token, new.version)
            return new.version
        if code == _MISSING:
            if self._restarted_since(entry):
                try:
                    self._write(key, entry.record, new, 0, token, [], True)
                    self._index(entry.record)
                except redis.RedisError as exc:
                    self._count_error("restore")
                    raise self._unavailable(f"restore stream '{key.stream_id}'", exc) from exc
                self._confirm(entry, new, token, new.version)
                log.warning(
                    "stream %s: Redis restarted empty; restored from this replica at version %d", key, new.version
                )
                return new.version
            self._forget(key, entry)
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")
        lost = entry.pending
        self._forget(key, entry)
        if lost:
            self._count_error("flush_conflict")
            log.warning(
                "stream %s: Redis holds version %d written by another replica; %d unpersisted local steps discarded",
                key,
                current,
                lost,
            )
        raise VersionConflictError(
            f"stream '{key.stream_id}' is at version {current}, write was based on {base}"
            + (f" ({lost} unpersisted steps of this replica discarded)" if lost else "")
        )

    def _save_uncached(self, key: StreamKey, entry: _Hot | None, new: StoredState, expected_version: int) -> int:
        """A write for a stream whose state the cache does not hold: always straight to Redis."""
        token = uuid.uuid4().hex
        try:
            code, current = self._write(key, None, new, expected_version, token, [], False)
        except redis.RedisError as exc:
            self._count_error("save_state")
            raise self._unavailable(f"save the state of stream '{key.stream_id}'", exc) from exc
        if code == _MISSING:
            self._forget(key)
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")
        if code == _CONFLICT:
            raise VersionConflictError(
                f"stream '{key.stream_id}' is at version {current}, write was based on {expected_version}"
            )
        self._confirm(entry, new, token, new.version)
        return new.version

    def _write(
        self,
        key: StreamKey,
        record: StreamRecord | None,
        new: StoredState,
        base: int,
        token: str,
        accepted: list[str],
        restore: bool,
    ) -> tuple[int, int]:
        """Run :data:`SAVE_SCRIPT`; returns (code, version in Redis)."""
        args: list[Any] = [
            base,
            new.version,
            token,
            state_to_bytes(new.state),
            new.samples_seen,
            repr(new.updated_at),
            new.state.meta.step,
            self.ttl_ms,
            record_to_json(record) if restore and record is not None else b"",
            *accepted,
        ]
        reply = cast(list[Any], self._save(keys=[self.keys.record(key), self.keys.state(key)], args=args))
        return int(reply[0]), int(reply[1])

    def _restore(self, entry: _Hot) -> bool:
        """After Redis restarted empty: re-register ``entry``'s stream and write its state; False if it was deleted."""
        if not self._restarted_since(entry):
            return False
        key = entry.record.key
        with entry.io:
            stored = entry.stored if entry.known else None
            token = (entry.token or uuid.uuid4().hex) if stored is not None else ""
            try:
                if stored is None:
                    self._create(
                        keys=[self.keys.record(key), self.keys.state(key)],
                        args=[record_to_json(entry.record), self.ttl_ms],
                    )
                else:
                    self._write(key, entry.record, stored, 0, token, [], True)
                self._index(entry.record)
            except redis.RedisError as exc:
                self._count_error("restore")
                self._mark_down(exc)
                return False
            version = stored.version if stored is not None else 0
            log.warning("stream %s: Redis restarted empty; restored from this replica at version %d", key, version)
            self._confirm(entry, stored, token, version)
        return True

    # -- write-behind and catch-up --------------------------------------------------------
    def _flush_loop(self) -> None:
        """Background thread: probe Redis while the circuit is open, write pending states when due."""
        tick = min(0.1, self.retry_interval, self.policy.every_seconds / 4)
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._flush_due(force=False)
            except Exception:
                log.exception("Redis state flusher failed; retrying")

    def _flush_due(self, force: bool) -> int:
        """Write every pending state that is due (all when ``force``); returns states still pending."""
        now = time.monotonic()
        if self.down:
            if not force and now - self._last_probe < self.retry_interval:
                return self.pending_states()
            self._last_probe = now
            try:
                self.client.ping()
            except redis.RedisError:
                return self.pending_states()
            self._mark_up()
        with self._lock:
            due = [
                (k, e)
                for k, e in self._cache.items()
                if e.pending > 0 and (force or self.policy.due(e.pending, e.dirty_since, now))
            ]
        for key, entry in due:
            if self.down:
                break
            self._flush(key, entry)
        return self.pending_states()

    def _flush(self, key: StreamKey, entry: _Hot) -> None:
        """Write ``entry``'s newest state on the version Redis last confirmed."""
        with entry.io:
            with self._lock:
                stored, base, pending, accepted = entry.stored, entry.persisted, entry.pending, list(entry.ambiguous)
            if stored is None or pending <= 0:
                return
            token = uuid.uuid4().hex
            try:
                code, current = self._write(key, entry.record, stored, base, token, accepted, False)
            except redis.RedisError as exc:
                self._count_error("flush")
                self._mark_down(exc)
                with self._lock:
                    entry.ambiguous = [*entry.ambiguous, token][-_MAX_AMBIGUOUS:]
                return
            if code == _WRITTEN:
                with self._lock:
                    entry.persisted = stored.version
                    entry.ambiguous.clear()
                    entry.epoch = self._run_id
                    if entry.stored is stored:
                        entry.token, entry.dirty_since = token, None
                    entry.generation += 1
                return
        if code == _MISSING and self._restore(entry):
            return
        self._forget(key, entry)
        if code == _MISSING:
            log.warning("stream %s was deleted in Redis; %d pending local steps discarded", key, pending)
            return
        self._count_error("flush_conflict")
        log.warning(
            "stream %s: Redis holds version %d written by another replica; %d unpersisted local steps discarded "
            "(write-behind and outages are only lossless when one replica serves a stream)",
            key,
            current,
            pending,
        )

    def flush(self) -> int:
        """Write every pending state now; returns how many remain pending (Redis unreachable)."""
        return self._flush_due(force=True)

    def close(self) -> None:
        """Stop the flusher, write every pending state (graceful shutdown), release the pool."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._flusher.join(timeout=5)
        try:
            left = self.flush()
        except redis.RedisError as exc:
            left = self.pending_states()
            log.error("flush at shutdown failed: %s", exc)
        if left:
            log.error("%d stream states could not be written to Redis at %s at shutdown and are lost", left, self.where)
        self.client.close()


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value
