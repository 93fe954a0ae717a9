"""A Redis that hangs (SIGSTOP: connections open, replies never come) never stalls the server.

The test starts its own redis-server and a real server process, stops Redis mid-run and
checks, while it is stopped: liveness stays fast (the event loop never waits for Redis), a
stream in the hot cache keeps predicting, and once the circuit is open registering and listing
answer 503 at once instead of waiting for socket timeouts. After SIGCONT everything recovers
and Redis holds every acknowledged step.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.integration.conftest import PrivateRedis, ServerProcess, predict
from tests.integration.test_redis_crash_and_outage import persisted, wait_for
from tta_server.state.base import StreamKey

pytestmark = pytest.mark.integration

REDIS_TIMEOUT_S = 2.0
"""The server's Redis socket timeout: a request that waited for Redis takes at least this long."""


class LivenessProbe:
    """Polls ``/healthz`` on its own connection until stopped and keeps every latency (bounded)."""

    def __init__(self, base: str, every: float = 0.02, max_probes: int = 5000) -> None:
        self.base, self.every, self.max_probes = base, every, max_probes
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as http:
            while not self._stop.is_set() and len(self.latencies) < self.max_probes:
                started = time.perf_counter()
                try:
                    ok = http.get("/healthz").status_code == 200
                except httpx.HTTPError as exc:
                    ok, reason = False, repr(exc)
                else:
                    reason = "status != 200"
                self.latencies.append(time.perf_counter() - started)
                if not ok:
                    self.failures.append(reason)
                self._stop.wait(self.every)

    def __enter__(self) -> LivenessProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = call()
    return response, time.perf_counter() - started


def test_a_hung_redis_never_stalls_liveness_cached_streams_or_the_registry(
    launch: Callable[..., ServerProcess], private_redis: PrivateRedis
) -> None:
    prefix = "hang"
    server = launch(private_redis.url, prefix, TTA_REDIS_TIMEOUT_S=str(REDIS_TIMEOUT_S), TTA_REDIS_RETRY_S="0.5")
    server.wait_ready()
    assert private_redis.proc is not None
    acknowledged = 0
    with server.client(timeout=60) as http:
        assert (
            http.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "cam"}).status_code == 201
        )
        for seed in range(3):
            assert predict(http, "cam", seed=seed).status_code == 200
            acknowledged += 1

        with LivenessProbe(server.base) as probe:
            private_redis.proc.send_signal(signal.SIGSTOP)
            try:
                # the cached stream keeps answering; the first write trips the circuit on its timeout
                for seed in range(3, 6):
                    r = predict(http, "cam", seed=seed)
                    assert r.status_code == 200, r.text
                    acknowledged += 1
                assert wait_for(lambda: http.get("/readyz").json()["status"] == "degraded", seconds=60)

                # once the circuit is open, registry calls answer 503 without waiting for Redis
                latencies = []
                for i in range(5):
                    body = {"model": "resnet20", "method": "bn", "stream_id": f"new-{i}"}
                    for call in (lambda b=body: http.post("/v1/streams", json=b), lambda: http.get("/v1/streams")):
                        r, seconds = timed(call)
                        assert r.status_code == 503, r.text
                        assert r.json()["error"]["code"] == "store_unavailable"
                        latencies.append(seconds)
                assert statistics.median(latencies) < 0.05, latencies
                assert max(latencies) < REDIS_TIMEOUT_S / 2, latencies
                r, seconds = timed(lambda: http.get("/metrics"))
                assert r.status_code == 200 and seconds < REDIS_TIMEOUT_S / 2, seconds

                for seed in range(6, 9):
                    r, seconds = timed(lambda s=seed: predict(http, "cam", seed=s))  # type: ignore[misc]
                    assert r.status_code == 200, r.text
                    assert seconds < REDIS_TIMEOUT_S, seconds
                    acknowledged += 1
            finally:
                private_redis.proc.send_signal(signal.SIGCONT)

            assert wait_for(lambda: http.get("/readyz").json()["status"] == "ready", seconds=60)
        assert not probe.failures, probe.failures[:3]
        assert len(probe.latencies) >= 20
        ordered = sorted(probe.latencies)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        assert p95 < 0.1, f"/healthz p95 {p95 * 1000:.0f} ms over {len(ordered)} probes"
        assert ordered[-1] < REDIS_TIMEOUT_S / 2, f"/healthz max {ordered[-1] * 1000:.0f} ms"

        description = http.get("/v1/streams/cam").json()
        assert description["steps"] == acknowledged
        assert (
            http.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "after"}).status_code
            == 201
        )

    stored = persisted(private_redis.url, prefix, StreamKey("default", "cam"))
    assert stored is not None and stored.state.meta.step == acknowledged
