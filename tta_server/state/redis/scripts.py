"""The Lua scripts of the Redis store and the calls that run them.

Each script touches only the keys of one stream (registration and state share the stream's
hash tag), so each is atomic on one node and legal in Redis Cluster. The scripts are what
makes state writes compare-and-set: a stale write is refused, never applied, and a write that
redis-py retried after a lost reply is recognised by its random token instead of being
reported as a conflict.

Optionally a state write is followed by ``WAIT <replicas> <ms>`` on the same connection (the
same node on a cluster), so the write is acknowledged only after that many replicas have it:
Redis replication is asynchronous, and without it a master killed right after answering can
take the newest step with it when its replica is promoted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import redis

from adapters.serialize import state_to_bytes
from tta_server.state.base import StoredState, StreamKey, StreamRecord
from tta_server.state.redis.keys import KeyLayout, record_to_json

# Reply codes of SAVE_SCRIPT.
MISSING, WRITTEN, CONFLICT, RESTORED = 0, 1, 2, 3
# Reply codes of LOAD_SCRIPT.
L_MISSING, L_EMPTY, L_SAME, L_NEW = 0, 1, 2, 3

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


class StateScripts:
    """The three scripts registered on one client (``EVALSHA``, loaded again after a Redis restart).

    ``wait_replicas`` > 0 makes every state write wait (up to ``wait_ms``) until that many
    replicas acknowledged it; ``on_unreplicated`` is called with the count reached when fewer did
    (the write is applied on the master either way and is reported as written).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: KeyLayout,
        ttl_ms: int,
        wait_replicas: int = 0,
        wait_ms: int = 1000,
        on_unreplicated: Callable[[int], None] | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.ttl_ms = ttl_ms
        self.wait_replicas = wait_replicas
        self.wait_ms = wait_ms
        self.on_unreplicated = on_unreplicated
        self._save = client.register_script(SAVE_SCRIPT)
        self._load = client.register_script(LOAD_SCRIPT)
        self._create = client.register_script(CREATE_SCRIPT)

    def write(
        self,
        key: StreamKey,
        record: StreamRecord | None,
        new: StoredState,
        base: int,
        token: str,
        accepted: list[str],
        restore: bool,
    ) -> tuple[int, int]:
        """Run :data:`SAVE_SCRIPT`; returns (code, version in Redis).

        ``restore`` re-registers ``record`` first when its registration is missing (Redis came
        back empty); ``accepted`` are tokens of this replica's writes with an unknown outcome.
        """
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
        keys = [self.keys.record(key), self.keys.state(key)]
        if not self.wait_replicas:
            reply = cast(list[Any], self._save(keys=keys, args=args))
            return int(reply[0]), int(reply[1])
        return self._write_and_wait(keys, args)

    def _write_and_wait(self, keys: list[str], args: list[Any]) -> tuple[int, int]:
        """The save script and ``WAIT`` in one pipeline: one connection, so WAIT covers this write.

        EVAL (not EVALSHA) so that a Redis without the script cached needs no second round trip
        inside the pipeline; on a cluster ``WAIT`` is sent to the node that owns the stream's slot.
        """
        pipe = self.client.pipeline(transaction=False)
        node = getattr(self.client, "get_node_from_key", None)
        target = {"target_nodes": node(keys[0])} if node is not None else {}
        pipe.execute_command("EVAL", SAVE_SCRIPT, len(keys), *keys, *args, **target)  # type: ignore[no-untyped-call]
        pipe.execute_command("WAIT", self.wait_replicas, self.wait_ms, **target)  # type: ignore[no-untyped-call]
        reply, acked = pipe.execute()
        code = int(reply[0])
        if code in (WRITTEN, RESTORED) and int(acked) < self.wait_replicas and self.on_unreplicated is not None:
            self.on_unreplicated(int(acked))
        return code, int(reply[1])

    def load(self, key: StreamKey, known_version: int, known_token: str) -> list[Any]:
        """Run :data:`LOAD_SCRIPT`: the reply starts with an ``L_*`` code."""
        return cast(
            list[Any],
            self._load(
                keys=[self.keys.record(key), self.keys.state(key)], args=[known_version, known_token, self.ttl_ms]
            ),
        )

    def create(self, record: StreamRecord) -> bool:
        """Run :data:`CREATE_SCRIPT`; False when the id is taken."""
        key = record.key
        created = self._create(
            keys=[self.keys.record(key), self.keys.state(key)], args=[record_to_json(record), self.ttl_ms]
        )
        return bool(created)
