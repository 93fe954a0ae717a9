"""Crashes and outages with real processes: a server killed with SIGKILL resumes from the last
persisted version; a graceful stop flushes write-behind steps; a Redis the test stops and
restarts on a free port leaves predictions flowing from the hot cache, readiness degraded,
failed writes counted, registry calls answering 503, and every step written when it returns."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from adapters.base import StateMeta, StreamState
from adapters.serialize import state_from_bytes
from tests.integration.conftest import PrivateRedis, ServerProcess, predict
from tta_server.app import create_app
from tta_server.metrics import Metrics
from tta_server.settings import Settings
from tta_server.state.base import StoredState, StoreUnavailableError, StreamKey, StreamRecord
from tta_server.state.redis import RedisStateStore

pytestmark = pytest.mark.integration


def persisted(url: str, prefix: str, key: StreamKey) -> StoredState | None:
    """What Redis holds for ``key``, read by a store without a cache."""
    reader = RedisStateStore(url, key_prefix=prefix, cache_max_streams=0)
    try:
        return reader.load_state(key)
    finally:
        reader.close()


def same_tensors(a: StreamState, b: StreamState) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def wait_for(condition: Callable[[], bool], seconds: float = 60.0) -> bool:
    """Poll ``condition`` until it holds; the generous default is for a loaded machine, a passing run returns early."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def metric(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_sigkill_resumes_from_last_persisted_version_and_sigterm_flushes(
    launch: Callable[..., ServerProcess], redis_url: str, prefix: str
) -> None:
    write_behind = {"TTA_REDIS_WRITE_POLICY": "write-behind", "TTA_REDIS_FLUSH_EVERY_STEPS": "3"}
    key = StreamKey("default", "crash")
    first = launch(redis_url, prefix, TTA_REDIS_FLUSH_EVERY_S="600", **write_behind)
    first.wait_ready()
    with first.client() as http:
        created = http.post("/v1/streams", json={"model": "resnet20", "method": "tent", "stream_id": "crash"})
        assert created.status_code == 201, created.text
        steps = [predict(http, "crash", seed=i).json()["step"] for i in range(7)]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    before = persisted(redis_url, prefix, key)
    assert before is not None and before.version == 6 and before.state.meta.step == 6  # steps 1-6 flushed, 7 lost

    second = launch(redis_url, prefix, TTA_REDIS_FLUSH_EVERY_S="600", **write_behind)
    second.wait_ready()
    with second.client() as http:
        exported = http.get("/v1/streams/crash/state")
        assert exported.status_code == 200 and exported.headers["X-State-Version"] == "6"
        resumed = state_from_bytes(exported.content)
        assert resumed.meta.step == 6 and same_tensors(resumed, before.state)
        assert http.get("/v1/streams/crash").json()["steps"] == 6
        assert [predict(http, "crash", seed=10 + i).json()["step"] for i in range(2)] == [7, 8]
    assert persisted(redis_url, prefix, key).version == 6  # type: ignore[union-attr]
    # Graceful stop: uvicorn runs the lifespan shutdown (store.close() flushes), then re-raises SIGTERM.
    assert second.kill(signal.SIGTERM) in (0, -signal.SIGTERM)
    after = persisted(redis_url, prefix, key)
    assert after is not None and after.version == 8 and after.state.meta.step == 8


def redis_settings(shared_dir: Path, url: str, prefix: str) -> Settings:
    return Settings(
        models_dir=shared_dir / "models",
        data_dir=shared_dir / "data",
        device="cpu",
        store_url=url,
        redis_key_prefix=prefix,
        redis_retry_s=0.1,
        redis_timeout_s=0.5,
        drift_sample_every=0,
        max_delay_ms=0,
    )


def npy_predict(client: TestClient, stream_id: str, seed: int) -> dict[str, object]:
    from tests.api.helpers import NPY, npy_bytes, random_images

    response = client.post(
        f"/v1/streams/{stream_id}/predict", content=npy_bytes(random_images(2, seed=seed)), headers=NPY
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_redis_outage_serves_from_cache_and_catches_up(private_redis: PrivateRedis, shared_dir: Path) -> None:
    prefix = "outage"
    key = StreamKey("default", "cam")
    with TestClient(create_app(redis_settings(shared_dir, private_redis.url, prefix))) as client:
        assert client.post("/v1/streams", json={"model": "resnet20", "method": "tent", "stream_id": "cam"}).is_success
        assert [npy_predict(client, "cam", i)["step"] for i in range(3)] == [1, 2, 3]
        assert client.get("/readyz").json()["status"] == "ready"

        private_redis.stop()  # no persistence: Redis comes back empty
        assert [npy_predict(client, "cam", 10 + i)["step"] for i in range(3)] == [4, 5, 6]
        ready = client.get("/readyz")
        body = ready.json()
        assert ready.status_code == 200 and body["status"] == "degraded" and body["store_ok"] is False
        assert any("state store redis degraded" in p and "unreachable" in p for p in body["problems"])
        metrics = client.get("/metrics").text
        assert metric(metrics, "tta_store_errors_total", '{operation="save_state"}') >= 3
        assert metric(metrics, "tta_store_pending_states") == 1
        refused = client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "new"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
        assert f"Redis at 127.0.0.1:{private_redis.port}/0 is unreachable" in refused.json()["error"]["message"]
        assert client.get("/v1/streams").status_code == 503
        cached = client.get("/v1/streams/cam")
        assert cached.status_code == 200 and cached.json()["steps"] == 6

        private_redis.start()
        assert wait_for(lambda: client.get("/readyz").json()["status"] == "ready"), client.get("/readyz").json()
        stored = persisted(private_redis.url, prefix, key)
        assert stored is not None and stored.version == 6 and stored.state.meta.step == 6
        listed = client.get("/v1/streams").json()
        assert listed["total"] == 1 and listed["streams"][0]["steps"] == 6
        assert npy_predict(client, "cam", 20)["step"] == 7
        assert "tta_store_pending_states 0.0" in client.get("/metrics").text
    final = persisted(private_redis.url, prefix, key)
    assert final is not None and final.version == 7


def test_redis_back_with_its_data_gets_the_pending_steps_by_compare_and_set(private_redis: PrivateRedis) -> None:
    """Redis restarted from its RDB: the pending state is written on the version Redis confirmed."""
    metrics = Metrics()
    store = RedisStateStore(
        private_redis.url, key_prefix="kept", retry_interval=0.1, socket_timeout=0.5, metrics=metrics
    )
    key = StreamKey("t", "s")
    try:
        store.create_stream(StreamRecord(key, "m", "bn", {}, 0))
        store.load_state(key)
        for v in (1, 2):
            store.save_state(
                key, StreamState({"x": torch.full((2,), float(v))}, StateMeta("bn", {}, "h", step=v)), v - 1, v
            )
        private_redis.stop(save=True)
        for v in (3, 4):
            store.get_stream(key)
            loaded = store.load_state(key)
            assert loaded is not None and loaded.version == v - 1
            store.save_state(
                key, StreamState({"x": torch.full((2,), float(v))}, StateMeta("bn", {}, "h", step=v)), v - 1, v
            )
        with pytest.raises(StoreUnavailableError, match=r"cannot list streams: Redis at .* is unreachable"):
            store.list_streams("t", 0, 10)
        assert store.pending_states() == 1 and (store.degradation() or "").startswith("Redis at 127.0.0.1")
        assert metrics.store_errors.labels("save_state")._value.get() == 2
        private_redis.start()
        assert wait_for(lambda: store.pending_states() == 0)
        assert store.degradation() is None
        stored = persisted(private_redis.url, "kept", key)
        assert stored is not None and stored.version == 4 and float(stored.state.tensors["x"][0]) == 4.0
        assert store.list_streams("t", 0, 10)[1] == 1
    finally:
        store.close()


def test_calls_that_need_redis_fail_fast_while_it_is_down(private_redis: PrivateRedis) -> None:
    """Calls that need Redis fail fast (connection refused) instead of hanging while it is down."""
    store = RedisStateStore(private_redis.url, key_prefix="fast", retry_interval=0.1, socket_timeout=0.5)
    try:
        private_redis.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="register stream 'x'"):
            store.create_stream(StreamRecord(StreamKey("t", "x"), "m", "bn", {}, 0))
        with pytest.raises(StoreUnavailableError, match="not in this replica's hot cache"):
            store.get_stream(StreamKey("t", "x"))
        assert time.monotonic() - started < 2.0
        assert store.count() == 0
    finally:
        store.close()


def timed(call: Callable[[], object]) -> tuple[float, object]:
    """Seconds ``call`` took and what it returned or raised."""
    started = time.perf_counter()
    try:
        outcome: object = call()
    except StoreUnavailableError as exc:
        outcome = exc
    return time.perf_counter() - started, outcome


def test_a_hung_redis_opens_the_circuit_and_every_later_call_answers_at_once(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP: connections are accepted but no reply ever comes (redis.TimeoutError, not a refusal).

    Only the call that trips the circuit may wait (2 x socket timeout with redis-py's one retry);
    after that, registering, listing, deleting, describing uncached streams and counting answer
    within 50 ms, cached streams keep serving, and SIGCONT brings everything back.
    """
    store = RedisStateStore(private_redis.url, key_prefix="hung", retry_interval=0.2, socket_timeout=0.5)
    cached, uncached = StreamKey("t", "cached"), StreamKey("t", "uncached")
    state = StreamState({"x": torch.zeros(2)}, StateMeta("bn", {}, "h", step=1))
    writer = RedisStateStore(private_redis.url, key_prefix="hung", cache_max_streams=0)
    assert private_redis.proc is not None
    try:
        store.create_stream(StreamRecord(cached, "m", "bn", {}, 0))
        assert store.save_state(cached, state, 0, 1) == 1
        writer.create_stream(StreamRecord(uncached, "m", "bn", {}, 0))
        writer.save_state(uncached, state, 0, 1)
        assert wait_for(lambda: store.count() == 2, seconds=30)

        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            assert wait_for(lambda: store.down, seconds=30)  # the background count read times out
            opened = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
            assert opened and "Timeout" in opened[0], opened  # a timeout, not a refused connection
            calls: dict[str, Callable[[], object]] = {
                "create_stream": lambda: store.create_stream(StreamRecord(StreamKey("t", "new"), "m", "bn", {}, 0)),
                "list_streams": lambda: store.list_streams(None, 0, 10),
                "delete_stream": lambda: store.delete_stream(cached),
                "state_summaries": lambda: store.state_summaries([uncached]),
                "get_stream uncached": lambda: store.get_stream(uncached),
                "load_state uncached": lambda: store.load_state(uncached),
                "ping": store.ping,
            }
            for name, call in calls.items():
                took, outcome = timed(call)
                assert isinstance(outcome, StoreUnavailableError), (name, outcome)
                assert took < 0.05, (name, took)
            served: dict[str, Callable[[], object]] = {
                "count": store.count,
                "get_stream cached": lambda: store.get_stream(cached),
                "load_state cached": lambda: store.load_state(cached),
                "save_state cached": lambda: store.save_state(cached, state, 1, 2),
                "state_summaries cached": lambda: store.state_summaries([cached]),
            }
            results = {}
            for name, call in served.items():
                took, results[name] = timed(call)
                assert not isinstance(results[name], StoreUnavailableError), (name, results[name])
                assert took < 0.05, (name, took)
            assert results["count"] == 2 and results["save_state cached"] == 2
            assert store.pending_states() == 1
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)

        assert wait_for(lambda: not store.down and store.pending_states() == 0, seconds=30), store.degradation()
        stored = persisted(private_redis.url, "hung", cached)
        assert stored is not None and stored.version == 2
        store.create_stream(StreamRecord(StreamKey("t", "after"), "m", "bn", {}, 0))
        assert store.list_streams("t", 0, 10)[1] == 3 and store.count() == 3
    finally:
        writer.close()
        store.close()


def test_batches_never_run_on_the_event_loop_with_a_redis_store(shared_dir: Path, redis_url: str, prefix: str) -> None:
    """A batch reads and writes its stream's state where it runs: with Redis behind it, always the worker thread."""
    with_redis = create_app(redis_settings(shared_dir, redis_url, prefix).model_copy(update={"inline_max_images": 8}))
    in_memory = create_app(redis_settings(shared_dir, "memory://", prefix).model_copy(update={"inline_max_images": 8}))
    assert with_redis.state.services.streams.batcher.inline_max_images == 0
    assert in_memory.state.services.streams.batcher.inline_max_images == 8
    with_redis.state.services.streams.close()
