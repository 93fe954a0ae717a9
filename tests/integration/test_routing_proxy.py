"""Stream-affine routing: docker/haproxy/haproxy.cfg in front of three real server processes.

The proxy hashes the stream id from ``/v1/streams/{id}/...`` onto a consistent-hash ring, so:

- every request of one stream lands on one replica (each replica's own /metrics counts its
  predict requests, ``tta_http_requests_total`` by route, and exactly one replica's count moves
  while one stream is driven);
- replicas never race on a stream's compare-and-set in steady state
  (``tta_store_errors_total{operation="version_conflict"}`` stays 0 on every replica);
- after a replica is SIGKILLed its streams continue on the others, which load them from Redis,
  and no acknowledged step is lost: each stream's final step count equals its acknowledged
  requests (plus at most the requests in flight at the kill, whose answer was lost with the
  process: such a step may have been written before the answer was).

The servers share the test Redis under a key prefix of this test. Skipped only when the haproxy
binary is absent (``make proxy`` installs Debian's package where it can).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ServerProcess, predict
from tests.support.proxy import Proxy, haproxy_binary

pytestmark = pytest.mark.integration

STREAMS = [f"cam-{i}" for i in range(9)]
AFFINITY_REQUESTS = 4
RUN_AFTER_KILL_S = 6.0
PREDICT_ROUTE = "/v1/streams/{stream_id}/predict"


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The value of one series on ``server``'s /metrics (0 when absent)."""
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def predicts_served(server: ServerProcess) -> float:
    return metric(server, "tta_http_requests_total", route=PREDICT_ROUTE, status="200")


@pytest.fixture
def routed(
    launch: Callable[..., ServerProcess], redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Proxy, list[ServerProcess]]]:
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed (make proxy installs it where it can)")
    replicas = [launch(redis_url, prefix) for _ in range(3)]
    for server in replicas:
        server.wait_ready()
    proxy = Proxy(binary, [f"127.0.0.1:{s.port}" for s in replicas], tmp_path / "haproxy.log")
    proxy.start()
    yield proxy, replicas
    proxy.stop()


def test_streams_stick_to_one_replica_and_survive_a_killed_one(  # noqa: PLR0915 (one scenario, in order)
    routed: tuple[Proxy, list[ServerProcess]],
) -> None:
    proxy, replicas = routed
    with httpx.Client(base_url=proxy.base, timeout=60) as http:
        for sid in STREAMS:
            created = http.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": sid})
            assert created.status_code == 201, created.text

        # 1. Affinity: while one stream is driven, exactly one replica's predict counter moves.
        owner: dict[str, int] = {}
        acknowledged = dict.fromkeys(STREAMS, 0)
        for sid in STREAMS:
            before = [predicts_served(s) for s in replicas]
            for i in range(AFFINITY_REQUESTS):
                response = predict(http, sid, n=2, seed=i)
                assert response.status_code == 200, response.text
                acknowledged[sid] += 1
            moved = [predicts_served(s) - b for s, b in zip(replicas, before, strict=True)]
            assert sorted(moved) == [0, 0, AFFINITY_REQUESTS], (sid, moved)
            owner[sid] = moved.index(AFFINITY_REQUESTS)
        assert len(set(owner.values())) >= 2, f"the ring put every stream on one replica: {owner}"

    # 2. Steady state under concurrency: every stream driven at once, no compare-and-set conflict.
    lost_answers = dict.fromkeys(STREAMS, 0)
    steps_seen: dict[str, list[int]] = {sid: [] for sid in STREAMS}
    stop = threading.Event()
    errors: list[str] = []

    def drive(sid: str) -> None:
        with httpx.Client(base_url=proxy.base, timeout=60) as client:
            i = 100
            while not stop.is_set():
                i += 1
                try:
                    response = predict(client, sid, n=2, seed=i)
                except httpx.HTTPError:
                    lost_answers[sid] += 1  # connection cut with the process: outcome unknown
                    continue
                if response.status_code == 200:
                    acknowledged[sid] += 1
                    steps_seen[sid].append(int(response.json()["step"]))
                elif response.status_code in (502, 503, 504):
                    lost_answers[sid] += 1  # the proxy lost the replica mid-request: outcome unknown
                else:
                    errors.append(f"{sid}: {response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=drive, args=(sid,), daemon=True) for sid in STREAMS]
    for thread in threads:
        thread.start()
    try:
        time.sleep(5.0)
        conflicts = [metric(s, "tta_store_errors_total", operation="version_conflict") for s in replicas]
        assert conflicts == [0.0, 0.0, 0.0], conflicts

        # 3. SIGKILL the replica that owns cam-0; its streams move to the others.
        victim = owner["cam-0"]
        before_kill = dict(acknowledged)
        replicas[victim].kill(signal.SIGKILL)
        time.sleep(RUN_AFTER_KILL_S)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors[:5]
    moved_streams = [sid for sid in STREAMS if owner[sid] == victim]
    assert all(acknowledged[sid] > before_kill[sid] for sid in moved_streams), (acknowledged, before_kill)

    # 4. No acknowledged step lost: Redis' step count is the acknowledged requests (+ lost answers).
    with httpx.Client(base_url=proxy.base, timeout=60) as http:
        for sid in STREAMS:
            described = http.get(f"/v1/streams/{sid}")
            assert described.status_code == 200, described.text
            steps = int(described.json()["steps"])
            assert acknowledged[sid] <= steps <= acknowledged[sid] + lost_answers[sid], (
                sid,
                steps,
                acknowledged[sid],
                lost_answers[sid],
            )
            assert steps_seen[sid] == sorted(set(steps_seen[sid])), sid  # every acknowledged step distinct
    survivors = [s for i, s in enumerate(replicas) if i != victim]
    after_kill_conflicts = sum(metric(s, "tta_store_errors_total", operation="version_conflict") for s in survivors)
    print(  # noqa: T201
        f"owners {owner}; killed replica {victim} owning {moved_streams}; acknowledged {acknowledged}; "
        f"answers lost with the process {sum(lost_answers.values())}; "
        f"conflicts after the kill {after_kill_conflicts:.0f}"
    )
