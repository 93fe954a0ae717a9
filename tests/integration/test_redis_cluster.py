"""The Redis store on a real Redis Cluster: the store contract, two replicas on one stream, a killed master.

A cluster of six ``redis-server`` processes (three masters, one replica each) on free loopback
ports is started by this module (``tests/support/redis_cluster.py``) and stopped by pid; the
shared test Redis is never touched. The tests are skipped only when ``redis-server`` or
``redis-cli`` is not installed.

- The store contract suite (tests/contract/test_store_contract.py) runs unchanged on the
  cluster: its tests are imported here and get this module's ``store`` fixture.
- The two-replica no-lost-update test (tests/integration/test_redis_replicas.py) runs unchanged
  with the cluster URL as its ``redis_url``.
- A master is SIGKILLed while two server processes adapt streams spread over all three
  masters; each stream is served by one replica (as the routing proxy does). Writes wait for
  one replica (``TTA_REDIS_WAIT_REPLICAS=1``), so once the replica is promoted every stream's
  step count in Redis equals its acknowledged requests, and every state still loads.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from tests.contract.test_store_contract import (
    test_compare_and_set_refuses_stale_writes,
    test_count_follows_registrations_and_deletions,
    test_create_get_and_duplicate,
    test_delete_removes_registration_state_and_listing,
    test_listing_pages_by_creation_time_per_tenant_and_for_all,
    test_save_and_load_round_trip,
    test_state_summaries_describe_states_without_tensors,
    test_tenants_and_ids_with_separators_never_collide,
)
from tests.integration.conftest import ServerProcess, predict
from tests.integration.test_redis_replicas import test_two_replicas_hammering_one_stream_lose_no_step
from tests.support.redis_cluster import LocalCluster, cluster_binaries
from tta_server.state.base import StateStore, StreamKey
from tta_server.state.redis import RedisStateStore
from tta_server.state.redis.connect import open_client
from tta_server.state.redis.keys import KeyLayout

pytestmark = pytest.mark.integration

__all__ = [
    "test_compare_and_set_refuses_stale_writes",
    "test_count_follows_registrations_and_deletions",
    "test_create_get_and_duplicate",
    "test_delete_removes_registration_state_and_listing",
    "test_listing_pages_by_creation_time_per_tenant_and_for_all",
    "test_save_and_load_round_trip",
    "test_state_summaries_describe_states_without_tensors",
    "test_tenants_and_ids_with_separators_never_collide",
    "test_two_replicas_hammering_one_stream_lose_no_step",
]


def _start_cluster(workdir: Path) -> LocalCluster:
    binaries = cluster_binaries()
    if binaries is None:
        pytest.skip("redis-server and redis-cli are needed for a local Redis Cluster")
    cluster = LocalCluster(binaries[0], binaries[1], workdir)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One cluster for the contract suite and the replica test (each test has its own key prefix)."""
    started = _start_cluster(tmp_path_factory.mktemp("cluster"))
    yield started
    started.stop()


def delete_cluster_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` on every master."""
    client = cast(RedisCluster, open_client(url, max_connections=4, socket_timeout=2.0, client_name="tta-test"))
    try:
        for node in client.get_primaries():  # type: ignore[no-untyped-call]
            node_client = client.get_redis_connection(node)
            batch = list(node_client.scan_iter(match=f"{prefix}:*", count=1000))
            for key in batch:  # one DEL per key: keys of a node span many slots
                node_client.delete(key)
    finally:
        client.close()


@pytest.fixture
def redis_url(cluster: LocalCluster) -> str:
    """The cluster's URL in place of the shared Redis (the imported replica test reads it)."""
    return cluster.url


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"tta-test-{uuid.uuid4().hex[:12]}"
    yield name
    delete_cluster_prefix(redis_url, name)


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[StateStore]:
    """The contract suite's store: a RedisStateStore on the cluster."""
    cluster_store = RedisStateStore(redis_url, key_prefix=prefix)
    assert cluster_store.cluster
    yield cluster_store
    cluster_store.close()


def test_stream_keys_share_a_slot_and_tenant_indexes_spread(redis_url: str, prefix: str) -> None:
    """Each stream's keys map to one slot; tenant indexes have slots of their own, the all-index one."""
    keys = KeyLayout(prefix, cluster=True)
    client = cast(RedisCluster, open_client(redis_url, max_connections=4, socket_timeout=2.0, client_name="tta-test"))
    try:

        def slot(name: str) -> int:
            return key_slot(name.encode())

        for tenant, sid in [("a", "s"), ("a/b{x}", "c:d"), ("t", "x" * 200)]:
            key = StreamKey(tenant, sid)
            assert slot(keys.record(key)) == slot(keys.state(key))
        assert slot(keys.all_index) == slot(keys.expiry_index)
        tenant_slots = {slot(keys.tenant_index(f"tenant-{i}")) for i in range(20)}
        assert len(tenant_slots) > 10
    finally:
        client.close()


STREAMS = 6
KILL_AFTER = 8
"""Acknowledged requests per stream before the master is killed."""
RUN_AFTER_KILL_S = 8.0


def test_killed_master_loses_no_acknowledged_step(  # noqa: PLR0915 (one scenario, told in order)
    launch: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """SIGKILL one master mid-run: once its replica is promoted, Redis holds every acknowledged step."""
    own = _start_cluster(tmp_path / "failover-cluster")
    prefix = f"tta-test-{uuid.uuid4().hex[:12]}"
    try:
        env = {"TTA_REDIS_WAIT_REPLICAS": "1", "TTA_REDIS_RETRY_S": "0.25", "TTA_REDIS_TIMEOUT_S": "1.0"}
        replicas = [launch(own.url, prefix, **env), launch(own.url, prefix, **env)]
        for server in replicas:
            server.wait_ready()
        keys = KeyLayout(prefix, cluster=True)
        streams = [f"cam-{i}" for i in range(STREAMS)]
        masters = {own.master_of(keys.state(StreamKey("default", s))).port for s in streams}
        assert len(masters) >= 2, "the streams should spread over several masters"
        with replicas[0].client() as http:
            for sid in streams:
                created = http.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": sid})
                assert created.status_code == 201, created.text

        acknowledged = dict.fromkeys(streams, 0)
        refused: dict[str, list[int]] = {s: [] for s in streams}
        kill_now = threading.Event()
        stop = threading.Event()
        errors: list[str] = []

        def drive(index: int) -> None:
            mine = [s for i, s in enumerate(streams) if i % 2 == index]  # one replica per stream
            try:
                with replicas[index].client(timeout=30) as http:
                    while not stop.is_set():
                        for sid in mine:
                            try:
                                response = predict(http, sid, n=2, seed=acknowledged[sid])
                            except httpx.HTTPError as exc:
                                errors.append(f"{sid}: {exc!r}")
                                continue
                            if response.status_code == 200:
                                acknowledged[sid] += 1
                                assert response.json()["step"] == acknowledged[sid]
                            else:
                                refused[sid].append(response.status_code)
                            if min(acknowledged.values()) >= KILL_AFTER:
                                kill_now.set()
            except Exception as exc:
                errors.append(f"replica {index}: {exc!r}")

        threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(2)]
        for thread in threads:
            thread.start()
        try:
            progressed = kill_now.wait(timeout=120)
            assert progressed, f"no progress before the kill: {acknowledged}, {_codes(refused)}, {errors[:3]}"
            victim = own.master_of(keys.state(StreamKey("default", streams[0])))
            before_kill = dict(acknowledged)
            own.kill(victim)
            killed_at = time.monotonic()
            time.sleep(RUN_AFTER_KILL_S)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert not errors, errors[:5]
        own.wait_healthy(30)
        failover_s = time.monotonic() - killed_at

        # Every replica catches up (pending states written) and says ready again.
        deadline = time.monotonic() + 30
        for server in replicas:
            while True:
                ready = httpx.get(f"{server.base}/readyz", timeout=5).json()
                if ready.get("status") == "ready" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert ready.get("status") == "ready", ready

        reader = RedisStateStore(own.url, key_prefix=prefix, cache_max_streams=0)
        try:
            for sid in streams:
                stored = reader.load_state(StreamKey("default", sid))
                assert stored is not None, sid
                assert stored.state.meta.step == acknowledged[sid], (sid, stored.state.meta.step, acknowledged)
                assert stored.version == acknowledged[sid]
                assert stored.samples_seen == 2 * acknowledged[sid]
            assert reader.count() >= 0 and len(reader.list_streams("default", 0, 100)[0]) == STREAMS
        finally:
            reader.close()
        assert set(_codes(refused)) <= {503}, _codes(refused)
        after = {s: acknowledged[s] - before_kill[s] for s in streams}
        print(  # noqa: T201
            f"failover healthy {failover_s:.1f}s after SIGKILL; acknowledged after the kill {after}; "
            f"refused {sum(len(v) for v in refused.values())}"
        )
        assert sum(after.values()) > 0, "no request succeeded after the kill"
    finally:
        own.stop()


def _codes(refused: dict[str, list[int]]) -> dict[int, int]:
    """How many refusals of each status code (a compact failure message)."""
    return dict(Counter(code for codes in refused.values() for code in codes))


def test_cluster_url_is_parsed_without_echoing_credentials() -> None:
    from tta_server.state.redis.connect import parse_cluster_url

    parsed = parse_cluster_url("rediss+cluster://u:secret@10.0.0.1:7000,10.0.0.2:7001/0?ssl_cert_reqs=none")
    assert parsed.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert parsed.first_node_url == "rediss://u:secret@10.0.0.1:7000/0?ssl_cert_reqs=none"
    assert "secret" not in parsed.where
    with pytest.raises(ValueError, match="only database 0"):
        parse_cluster_url("redis+cluster://h:1/3")
    with pytest.raises(ValueError, match="not host:port") as caught:
        parse_cluster_url("redis+cluster://u:secret@h")
    assert "secret" not in str(caught.value)
