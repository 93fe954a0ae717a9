"""The Redis state store: registrations and states shared by replicas, with a hot cache.

Why it looks the way it does:

- **No lost updates.** Every state write names the version it was based on and runs as one
  Lua script that compares and sets (:mod:`~tta_server.state.redis.scripts`). A stale write is
  refused with :class:`VersionConflictError`; the runner then reloads and recomputes the step.
  Each write also carries a random token, so a write whose reply was lost (and which redis-py
  retried) is recognised as already applied instead of being reported as a conflict.
- **Hot cache** (:mod:`~tta_server.state.redis.cache`): a load only checks that the cached
  (version, token) is current; entries are dropped on every conflict, so a reload after a
  conflict reads fresh from Redis.
- **Write policy** (:mod:`tta_server.state.write_policy`): write-through by default;
  write-behind keeps steps in the cache, and the background thread
  (:mod:`~tta_server.state.redis.flusher`) writes them every N steps / T seconds and
  :meth:`RedisStateStore.close` at shutdown.
- **Outages** (:mod:`~tta_server.state.redis.circuit`). A connection error or timeout opens
  a circuit. While it is open no call touches the network: streams in the hot cache keep
  serving and their new states stay pending in memory (each counted as a failed write);
  everything else (registering, listing, deleting, uncached streams) fails at once with
  :class:`StoreUnavailableError` (503). Only the background thread probes Redis; when it
  answers, every pending state is written with a compare-and-set against the last version
  Redis confirmed. If Redis came back empty (restarted without persistence: a new
  ``run_id``), this replica re-registers the streams it holds and writes their states, so
  nothing it acknowledged is lost.
- **count()** answers from memory (a gauge must not wait for Redis): the background thread
  reads the total every second, and this process's registrations and deletions adjust it.

- **Redis Cluster** (``redis+cluster://``, :mod:`~tta_server.state.redis.connect`): the same
  commands through redis-py's cluster client; every script and transaction touches one
  stream's keys (one hash tag, one slot) or the index slot. Restart detection by ``run_id`` is
  off there: a failover changes the node behind a slot without losing data, which a new
  ``run_id`` would wrongly report as an empty restart. ``wait_replicas`` makes each state write
  wait for replicas, so a killed master's promoted replica holds every acknowledged step.

Key layout and hash tags: :mod:`tta_server.state.redis.keys`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TypeGuard, cast

import redis

from adapters.base import StreamState
from adapters.serialize import state_from_bytes
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
from tta_server.state.redis.cache import HotCache, HotEntry
from tta_server.state.redis.circuit import CircuitBreaker
from tta_server.state.redis.connect import (
    STORE_ERRORS,
    is_cluster_url,
    is_redis_url,
    location,
    open_client,
    outage_errors,
)
from tta_server.state.redis.flusher import Flusher
from tta_server.state.redis.indexes import ListingIndexes, StreamCount
from tta_server.state.redis.keys import KeyLayout, member_of, record_from_json
from tta_server.state.redis.scripts import (
    CONFLICT,
    L_EMPTY,
    L_MISSING,
    L_SAME,
    MISSING,
    RESTORED,
    WRITTEN,
    StateScripts,
)
from tta_server.state.write_policy import WritePolicy

log = logging.getLogger(__name__)


def redacted_location(client: redis.Redis) -> str:
    """``host:port/db`` (or the socket path) of a single server, never the credentials."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class RedisStateStore:
    """The :class:`~tta_server.state.base.StateStore` backed by Redis; thread-safe.

    ``clock`` (monotonic seconds) drives the circuit's probe interval and the age of pending
    write-behind steps; ``count_interval`` is how often the background thread reads the count.
    ``wait_replicas`` > 0 acknowledges a state write only once that many replicas have it (or
    half the socket timeout passed, counted as ``replica_wait`` errors).
    """

    name = "redis"
    in_process = False

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
        count_interval: float = 1.0,
        wait_replicas: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not is_redis_url(url):
            raise ValueError(
                f"not a Redis URL: {url.rsplit('@', maxsplit=1)[-1]!r} "
                "(use redis://, rediss://, redis+cluster:// or rediss+cluster://)"
            )
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"Redis idle TTL must be positive, got {ttl_seconds}")
        if wait_replicas < 0:
            raise ValueError(f"wait_replicas must be >= 0, got {wait_replicas}")
        self.cluster = is_cluster_url(url)
        self.keys = KeyLayout(key_prefix, cluster=self.cluster)
        self.ttl_seconds = ttl_seconds
        self.policy = policy or WritePolicy()
        self.cache = HotCache(cache_max_streams, clock)
        self.cache_max_streams = cache_max_streams
        self.retry_interval = retry_interval
        self.device = device
        self.metrics = metrics
        # One pool per store (per node on a cluster), shared by every thread; retries: connect.py.
        self.client: redis.Redis = open_client(
            url, max_connections=max_connections, socket_timeout=socket_timeout, client_name=client_name
        )
        self.where = location(self.client, url)
        self.scripts = StateScripts(
            self.client,
            self.keys,
            self.ttl_ms,
            wait_replicas=wait_replicas,
            wait_ms=max(1, int(socket_timeout * 500)),
            on_unreplicated=self._unreplicated,
        )
        self.indexes = ListingIndexes(self.client, self.keys, ttl_seconds)
        self.circuit = CircuitBreaker(self.where, retry_interval, clock, outage_errors(url))
        self.counts = StreamCount()
        self._run_id: str | None = None
        self._closed = False
        if metrics is not None:
            metrics.track_gauge(metrics.store_pending_states, self.pending_states)
        tick = min(0.1, retry_interval, self.policy.every_seconds / 4)
        self._flusher = Flusher(self, tick=tick, count_interval=count_interval, clock=clock)
        self._flusher.start()

    # -- health ---------------------------------------------------------------------------
    @property
    def ttl_ms(self) -> int:
        return int(self.ttl_seconds * 1000) if self.ttl_seconds else 0

    @property
    def down(self) -> bool:
        """True while the circuit is open (a Redis call failed and no probe succeeded since)."""
        return self.circuit.is_open

    def ping(self) -> None:
        """PING Redis; raises :class:`StoreUnavailableError` when it does not answer.

        While the circuit is open this answers at once from the background prober's last
        result, so a readiness probe never waits for socket timeouts during a partition.
        """
        if self.circuit.is_open:
            raise StoreUnavailableError(
                f"Redis at {self.where} unreachable for {self.circuit.down_for():.0f}s "
                f"(probed every {self.retry_interval:g}s)"
            )
        try:
            self.client.ping()
        except STORE_ERRORS as exc:
            self.circuit.record_failure(exc)
            raise StoreUnavailableError(f"Redis at {self.where} does not answer: {exc}") from exc
        self._mark_up()

    def pending_states(self) -> int:
        """Streams whose newest state is not yet in Redis (a gauge)."""
        return self.cache.pending_count()

    def degradation(self) -> str | None:
        """Why readiness should say ``degraded`` (Redis down, or an outage's backlog), else None."""
        pending = self.pending_states()
        if self.circuit.is_open:
            return (
                f"Redis at {self.where} unreachable for {self.circuit.down_for():.0f}s: serving "
                f"{len(self.cache)} cached streams from memory, {pending} states not yet persisted"
            )
        if pending and self.policy.write_through:
            return f"{pending} stream states not yet written to Redis at {self.where} (catching up)"
        return None

    def _mark_up(self) -> None:
        """Close the circuit after a successful call; after an outage, re-read the run_id and catch up."""
        down_for = self.circuit.record_success()
        if down_for is None:
            return
        try:
            self._refresh_run_id()
        except STORE_ERRORS:
            self._run_id = None
        log.warning(
            "Redis at %s answers again after %.1fs; writing %d pending states",
            self.where,
            down_for,
            self.pending_states(),
        )
        self._flusher.wake()

    def _require_redis(self, action: str) -> None:
        """Fail fast, without any network I/O, while the circuit is open."""
        if self.circuit.is_open:
            raise StoreUnavailableError(
                f"cannot {action}: Redis at {self.where} is unreachable "
                f"(for {self.circuit.down_for():.0f}s, probed every {self.retry_interval:g}s)"
            )

    def _refresh_run_id(self) -> str | None:
        """The server's ``run_id`` (changes on every restart); None when INFO is not allowed, and
        always None on a cluster (a failover changes the node, not the data: not a restart)."""
        if self.cluster:
            return None
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
            except STORE_ERRORS:
                return None
        return self._run_id

    def _restarted_since(self, entry: HotEntry) -> bool:
        """True when Redis restarted (new run_id) since ``entry`` was last confirmed: data was lost, not deleted."""
        if entry.epoch is None:
            return False
        try:
            current = self._refresh_run_id()
        except STORE_ERRORS:
            return False
        return current is not None and current != entry.epoch

    def _unreplicated(self, acked: int) -> None:
        """A state write reached fewer replicas than ``wait_replicas`` in time: counted and logged."""
        self._count_error("replica_wait")
        log.warning("state write acknowledged by %d replicas of Redis at %s, wanted more", acked, self.where)

    def _count_cache(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.store_cache.labels(result).inc()

    def _count_error(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(operation).inc()

    def _unavailable(self, action: str, exc: BaseException) -> StoreUnavailableError:
        """The 503 error for ``action``, saying whether Redis is unreachable or refused the command."""
        if self.circuit.record_failure(exc):
            return StoreUnavailableError(f"cannot {action}: Redis at {self.where} is unreachable ({exc})")
        return StoreUnavailableError(f"cannot {action}: Redis at {self.where} answered with an error ({exc})")

    def _confirm(
        self,
        entry: HotEntry | None,
        stored: StoredState | None,
        token: str,
        persisted: int,
        generation: int | None = None,
    ) -> None:
        self.cache.confirm(entry, stored, token, persisted, self._run_id, generation)

    # -- registry -------------------------------------------------------------------------
    def create_stream(self, record: StreamRecord) -> None:
        """Register ``record``: index first (NX), then the registration (NX); 409 when the id is taken.

        Indexing first means a crash in between leaves an index member without a record,
        which listing prunes, never a stream that exists but cannot be listed.
        """
        key = record.key
        self._require_redis(f"register stream '{key.stream_id}'")
        try:
            with self.counts.mutation() as counts:
                had_member = self.indexes.has(key)
                self.indexes.add(record)
                if not self.scripts.create(record):
                    raise StreamExistsError(f"stream '{key.stream_id}' already exists")
                if had_member:
                    self.indexes.reindex(record)
                else:
                    counts.adjust(+1)
            self._epoch()
        except STORE_ERRORS as exc:
            self._count_error("create_stream")
            raise self._unavailable(f"register stream '{key.stream_id}'", exc) from exc
        self._mark_up()
        self._confirm(self.cache.remember(record, self._run_id), None, "", 0)

    def get_stream(self, key: StreamKey) -> StreamRecord:
        """The registration, read from Redis (refreshing the idle TTL), or from the cache while Redis is down."""
        entry = self.cache.get(key)
        if self.circuit.is_open:
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
        except STORE_ERRORS as exc:
            self._count_error("get_stream")
            if self.circuit.record_failure(exc) and entry is not None:
                return entry.record
            raise self._unavailable(f"read stream '{key.stream_id}'", exc) from exc
        if raw is None:
            if entry is not None and self._restore(entry):
                return entry.record
            self.cache.forget(key)
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")
        record = record_from_json(raw)
        if record.key != key:
            raise ValueError(f"Redis key {self.keys.record(key)} holds the registration of {record.key}")
        self._epoch()
        self.cache.remember(record, self._run_id)
        return record

    def list_streams(self, tenant: str | None, offset: int, limit: int) -> tuple[list[StreamRecord], int]:
        """A page ordered by creation time (then tenant/id), and the total, from the sorted-set indexes."""
        self._require_redis("list streams")
        try:
            page = self.indexes.page(tenant, offset, limit)
        except STORE_ERRORS as exc:
            self._count_error("list_streams")
            raise self._unavailable("list streams", exc) from exc
        self._mark_up()
        return page

    def delete_stream(self, key: StreamKey) -> None:
        """Remove registration, state and index members; 404 when Redis had no registration."""
        self._require_redis(f"delete stream '{key.stream_id}'")
        try:
            with self.counts.mutation() as counts:
                pipe = self.client.pipeline(transaction=True)
                pipe.exists(self.keys.record(key))
                pipe.delete(self.keys.record(key), self.keys.state(key))
                existed = bool(pipe.execute()[0])
                counts.adjust(-self.indexes.remove([member_of(key)]))
        except STORE_ERRORS as exc:
            self._count_error("delete_stream")
            raise self._unavailable(f"delete stream '{key.stream_id}'", exc) from exc
        self._mark_up()
        self.cache.forget(key)
        if not existed:
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")

    def count(self) -> int:
        """Registered streams (all tenants), from memory: never waits for Redis (a gauge must not hang).

        The background thread reads the total every ``count_interval`` seconds; this process's
        registrations and deletions adjust it at once. While Redis is down: the last count read.
        """
        return self.counts.value

    def refresh_count(self) -> None:
        """Read the total from Redis (prunes expired members first); called by the background thread."""
        if self.circuit.is_open:
            return
        snapshot = self.counts.snapshot()
        try:
            total = self.indexes.total()
        except STORE_ERRORS as exc:
            if not self.circuit.record_failure(exc):
                log.warning("stream count unavailable: %s", exc)
            return
        self.counts.offer(snapshot, total)

    # -- state ----------------------------------------------------------------------------
    def _cache_is_authoritative(self, entry: HotEntry | None) -> TypeGuard[HotEntry]:
        """The cached state is the newest one can get: it holds unpersisted steps, or Redis is down."""
        return entry is not None and entry.known and (entry.pending > 0 or self.circuit.is_open)

    def load_state(self, key: StreamKey) -> StoredState | None:
        """The newest state: from the cache when it holds unpersisted steps or Redis is down,
        else from Redis (only the version and token cross the network when the cache is current)."""
        entry = self.cache.get(key)
        if self._cache_is_authoritative(entry):
            self._count_cache("hit")
            return entry.stored
        if self.circuit.is_open:
            raise StoreUnavailableError(
                f"Redis at {self.where} is unreachable and the state of stream '{key.stream_id}' "
                "is not in this replica's hot cache"
            )
        generation = entry.generation if entry is not None else 0
        cached = entry.stored if entry is not None and entry.known else None
        known_version, known_token = (cached.version, entry.token) if cached is not None and entry else (-1, "")
        try:
            reply = self.scripts.load(key, known_version, known_token)
        except STORE_ERRORS as exc:
            self._count_error("load_state")
            if self.circuit.record_failure(exc) and entry is not None and entry.known:
                return entry.stored
            raise self._unavailable(f"load the state of stream '{key.stream_id}'", exc) from exc
        code = int(reply[0])
        if code == L_MISSING:
            if entry is not None and self._restore(entry):
                return entry.stored
            self.cache.forget(key)
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")
        if code == L_EMPTY:
            self._confirm(entry, None, "", 0, generation)
            return None
        if code == L_SAME and cached is not None:
            self._confirm(entry, cached, known_token, cached.version, generation)
            self._count_cache("hit")
            return cached
        self._count_cache("miss")  # the state's bytes crossed the network and were deserialized
        version, token = int(reply[1]), _text(reply[2])
        state = state_from_bytes(bytes(reply[3]), device=self.device)
        stored = StoredState(state, version, int(reply[4]), float(reply[5]))
        self._confirm(entry, stored, token, version, generation)
        return stored

    def state_summaries(self, keys: Sequence[StreamKey]) -> dict[StreamKey, StateSummary]:
        """Summaries from the hot cache where it holds unpersisted steps (or Redis is down), else one
        pipelined read of each state's small fields (the blob's length, never the blob); does not
        refresh idle TTLs."""
        out: dict[StreamKey, StateSummary] = {}
        remote: list[StreamKey] = []
        for key in keys:
            entry = self.cache.get(key)
            if self._cache_is_authoritative(entry):
                if entry.stored is not None:
                    out[key] = StateSummary.of(entry.stored)
            else:
                remote.append(key)
        if not remote:
            return out
        self._require_redis("describe stream states")
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in remote:
                pipe.hmget(self.keys.state(key), ["v", "s", "n", "u"])
                pipe.hstrlen(self.keys.state(key), "b")
            replies = pipe.execute()
        except STORE_ERRORS as exc:
            self._count_error("state_summaries")
            raise self._unavailable("describe stream states", exc) from exc
        for i, key in enumerate(remote):
            fields, size = cast(list[bytes | None], replies[2 * i]), int(replies[2 * i + 1])
            if fields[0] is None:
                continue
            version, step, samples, updated = (_text(f) for f in fields)
            out[key] = StateSummary(int(version), int(step or 0), int(samples or 0), float(updated or 0.0), size)
        return out

    def save_state(self, key: StreamKey, state: StreamState, expected_version: int, samples_seen: int) -> int:
        """Compare-and-set ``state`` on ``expected_version``; returns the new version.

        Write-through writes to Redis now; write-behind keeps the step in the cache until it is
        due. While Redis is down a cached stream's step is accepted into the cache (counted as
        a failed write) and written when Redis answers again.
        """
        new = StoredState(state, expected_version + 1, samples_seen, time.time())
        entry = self.cache.get(key)
        if entry is None or not entry.known:
            return self._save_uncached(key, entry, new, expected_version)
        with entry.io:
            plan = self.cache.plan(entry, key, expected_version, self.policy)
            if plan.due and not self.circuit.is_open:
                token = uuid.uuid4().hex
                try:
                    reply = self.scripts.write(key, entry.record, new, plan.base, token, list(entry.ambiguous), False)
                except STORE_ERRORS as exc:
                    self._count_error("save_state")
                    if not self.circuit.record_failure(exc):
                        raise self._unavailable(f"save the state of stream '{key.stream_id}'", exc) from exc
                    self.cache.add_ambiguous(entry, token)
                else:
                    return self._after_write(key, entry, new, token, reply, plan.base)
            elif plan.due:
                self._count_error("save_state")
            if expected_version != plan.local:
                # The cache is this write's only reference now, and the write was not based on it.
                raise VersionConflictError(
                    f"stream '{key.stream_id}' is at version {plan.local}, write was based on {expected_version}"
                )
            self.cache.stage(entry, new)
            return new.version

    def _after_write(
        self, key: StreamKey, entry: HotEntry, new: StoredState, token: str, reply: tuple[int, int], base: int
    ) -> int:
        """Apply the outcome of a write made by :meth:`save_state` (called with ``entry.io`` held)."""
        code, current = reply
        if code in (WRITTEN, RESTORED):
            if code == RESTORED:
                self.indexes.add(entry.record)
            self._confirm(entry, new, token, new.version)
            return new.version
        if code == MISSING:
            if self._restarted_since(entry):
                try:
                    self.scripts.write(key, entry.record, new, 0, token, [], True)
                    self.indexes.add(entry.record)
                except STORE_ERRORS as exc:
                    self._count_error("restore")
                    raise self._unavailable(f"restore stream '{key.stream_id}'", exc) from exc
                self._confirm(entry, new, token, new.version)
                log.warning(
                    "stream %s: Redis restarted empty; restored from this replica at version %d", key, new.version
                )
                return new.version
            self.cache.forget(key, entry)
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")
        lost = entry.pending
        self.cache.forget(key, entry)
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

    def _save_uncached(self, key: StreamKey, entry: HotEntry | None, new: StoredState, expected_version: int) -> int:
        """A write for a stream whose state the cache does not hold: always straight to Redis."""
        if self.circuit.is_open:
            self._count_error("save_state")
        self._require_redis(f"save the state of stream '{key.stream_id}'")
        token = uuid.uuid4().hex
        try:
            code, current = self.scripts.write(key, None, new, expected_version, token, [], False)
        except STORE_ERRORS as exc:
            self._count_error("save_state")
            raise self._unavailable(f"save the state of stream '{key.stream_id}'", exc) from exc
        if code == MISSING:
            self.cache.forget(key)
            raise StreamNotFoundError(f"stream '{key.stream_id}' does not exist")
        if code == CONFLICT:
            raise VersionConflictError(
                f"stream '{key.stream_id}' is at version {current}, write was based on {expected_version}"
            )
        self._confirm(entry, new, token, new.version)
        return new.version

    def _restore(self, entry: HotEntry) -> bool:
        """After Redis restarted empty: re-register ``entry``'s stream and write its state; False if it was deleted."""
        if not self._restarted_since(entry):
            return False
        key = entry.record.key
        with entry.io:
            stored = entry.stored if entry.known else None
            token = (entry.token or uuid.uuid4().hex) if stored is not None else ""
            try:
                if stored is None:
                    self.scripts.create(entry.record)
                else:
                    self.scripts.write(key, entry.record, stored, 0, token, [], True)
                self.indexes.add(entry.record)
            except STORE_ERRORS as exc:
                self._count_error("restore")
                self.circuit.record_failure(exc)
                return False
            version = stored.version if stored is not None else 0
            log.warning("stream %s: Redis restarted empty; restored from this replica at version %d", key, version)
            self._confirm(entry, stored, token, version)
        return True

    # -- write-behind and catch-up (driven by the flusher thread) ---------------------------
    def probe(self) -> bool:
        """PING Redis for the prober; closes the circuit (and starts the catch-up) when it answers."""
        try:
            self.client.ping()
        except STORE_ERRORS:
            return False
        self._mark_up()
        return True

    def flush_due(self, force: bool) -> int:
        """Write every pending state that is due (all when ``force``); returns states still pending.

        While the circuit is open this only probes Redis, once per probe interval (or now when
        ``force``), and writes nothing unless the probe closed the circuit.
        """
        if self.circuit.is_open and not (self.circuit.probe_due(force) and self.probe()):
            return self.pending_states()
        for key, entry in self.cache.due(self.policy, force):
            if self.circuit.is_open:
                break
            self._flush(key, entry)
        return self.pending_states()

    def _flush(self, key: StreamKey, entry: HotEntry) -> None:
        """Write ``entry``'s newest state on the version Redis last confirmed."""
        with entry.io:
            job = self.cache.flush_job(entry)
            if job is None:
                return
            token = uuid.uuid4().hex
            try:
                code, current = self.scripts.write(key, entry.record, job.stored, job.base, token, job.accepted, False)
            except STORE_ERRORS as exc:
                self._count_error("flush")
                self.circuit.record_failure(exc)
                self.cache.add_ambiguous(entry, token)
                return
            if code == WRITTEN:
                self.cache.flushed(entry, job.stored, token, self._run_id)
                return
        if code == MISSING and self._restore(entry):
            return
        self.cache.forget(key, entry)
        if code == MISSING:
            log.warning("stream %s was deleted in Redis; %d pending local steps discarded", key, job.pending)
            return
        self._count_error("flush_conflict")
        log.warning(
            "stream %s: Redis holds version %d written by another replica; %d unpersisted local steps discarded "
            "(write-behind and outages are only lossless when one replica serves a stream)",
            key,
            current,
            job.pending,
        )

    def flush(self) -> int:
        """Write every pending state now; returns how many remain pending (Redis unreachable)."""
        return self.flush_due(force=True)

    def close(self) -> None:
        """Stop the background thread, write every pending state (graceful shutdown), release the pool."""
        if self._closed:
            return
        self._closed = True
        self._flusher.stop(timeout=5)
        try:
            left = self.flush()
        except STORE_ERRORS as exc:
            left = self.pending_states()
            log.error("flush at shutdown failed: %s", exc)
        if left:
            log.error("%d stream states could not be written to Redis at %s at shutdown and are lost", left, self.where)
        self.client.close()


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value
