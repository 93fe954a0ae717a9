"""Redis store configuration without a server: URLs and credentials, settings, key layout, write policy.

No Redis server is needed (constructing a store does not wait for one; its background thread
finds nothing answering and opens the circuit); behaviour against a real server is in
tests/integration/test_redis_*.py.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.connection import SSLConnection

from tta_server.settings import Settings
from tta_server.state.base import StreamKey, StreamRecord
from tta_server.state.factory import StoreOptions, open_store
from tta_server.state.memory import MemoryStateStore
from tta_server.state.redis import RedisStateStore
from tta_server.state.redis.keys import KeyLayout, key_of_member, member_of, record_from_json, record_to_json
from tta_server.state.write_policy import WriteMode, WritePolicy


def test_rediss_url_with_credentials_uses_tls_and_never_shows_the_password() -> None:
    settings = Settings(
        store_url="rediss://alice:s3cret@127.0.0.1:6380/3?ssl_cert_reqs=none",
        redis_key_prefix="prod",
        redis_max_connections=7,
        redis_write_policy=WriteMode.WRITE_BEHIND,
        redis_flush_every_steps=4,
        redis_flush_every_s=2.5,
        redis_ttl_s=3600,
    )
    options = settings.store_options()
    assert options.url == settings.store_url and options.write_policy == WritePolicy(WriteMode.WRITE_BEHIND, 4, 2.5)
    store = open_store(options)
    try:
        assert isinstance(store, RedisStateStore)
        pool = store.client.connection_pool
        assert pool.connection_class is SSLConnection and pool.max_connections == 7
        kwargs = pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("alice", "s3cret", 3)
        assert store.where == "127.0.0.1:6380/3" and "s3cret" not in store.where
        assert store.policy == WritePolicy(WriteMode.WRITE_BEHIND, 4, 2.5) and store.ttl_ms == 3_600_000
        assert store.keys.record(StreamKey("t", "s")) == "prod:{t/s}:rec"
    finally:
        store.close()


def test_store_url_validation() -> None:
    assert Settings(store_url="redis://127.0.0.1:6379/0").store_url.startswith("redis://")
    assert isinstance(open_store(StoreOptions()), MemoryStateStore)
    assert StoreOptions() == Settings().store_options()  # the defaults agree
    with pytest.raises(ValueError, match="unsupported state store URL 'host:1'"):
        open_store(StoreOptions(url="http://bob:hunter2@host:1"))
    with pytest.raises(ValidationError, match=r"use memory://, redis://, rediss://, redis\+cluster://") as caught:
        Settings(store_url="http://bob:hunter2@127.0.0.1:6379")
    assert "hunter2" not in caught.value.errors()[0]["msg"]  # the message the CLI prints
    cluster = Settings(store_url="rediss+cluster://bob:hunter2@10.0.0.1:7000,10.0.0.2:7000").store_options()
    assert cluster.url.startswith("rediss+cluster://")
    with pytest.raises(ValidationError, match="not host:port") as caught:
        Settings(store_url="redis+cluster://bob:hunter2@10.0.0.1")
    assert "hunter2" not in caught.value.errors()[0]["msg"]
    with pytest.raises(ValidationError, match="only database 0"):
        Settings(store_url="redis+cluster://10.0.0.1:7000/2")
    with pytest.raises(ValidationError, match="redis_key_prefix"):
        Settings(redis_key_prefix="a{b}")
    with pytest.raises(ValueError, match="braces"):
        KeyLayout("a{b}")
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisStateStore("memory://")


def test_member_encoding_round_trips_and_separates_tenants() -> None:
    odd = StreamKey("a/b", "c")
    assert member_of(odd) != member_of(StreamKey("a", "b/c"))
    for key in (odd, StreamKey("{x}:%", "cam-7"), StreamKey("default", "s.1_2")):
        assert key_of_member(member_of(key)) == key
        assert key_of_member(member_of(key).encode()) == key
    layout = KeyLayout("p")
    assert layout.record(odd) == "p:{a%2Fb/c}:rec" and layout.state(odd) == "p:{a%2Fb/c}:state"
    assert layout.tenant_index("a/b") == "p:{idx}:t:a%2Fb" and layout.all_index == "p:{idx}:all"
    with pytest.raises(ValueError, match="malformed stream index member"):
        key_of_member("no-separator")


def test_record_json_round_trip_and_errors() -> None:
    record = StreamRecord(StreamKey("t", "s"), "resnet20", "tent", {"lr": 0.001}, 3, {"site": "a"}, created_at=12.5)
    assert record_from_json(record_to_json(record)) == record
    with pytest.raises(ValueError, match="malformed stream registration"):
        record_from_json(b'{"tenant": "t"}')


def test_write_policy_decides_when_steps_are_due() -> None:
    through = WritePolicy()
    assert through.write_through and through.due(1, None, 0.0) and not through.due(0, None, 0.0)
    behind = WritePolicy(WriteMode.WRITE_BEHIND, every_steps=3, every_seconds=5.0)
    assert not behind.due(2, 10.0, 14.0)
    assert behind.due(3, 10.0, 10.0)  # N steps
    assert behind.due(1, 10.0, 15.0)  # T seconds since the oldest pending step
    with pytest.raises(ValueError, match="every_steps must be >= 1"):
        WritePolicy(WriteMode.WRITE_BEHIND, every_steps=0)
