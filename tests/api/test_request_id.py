"""X-Request-ID on every answer, in error bodies and in the log lines of its request, worker thread included."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.app import create_app
from tta_server.observability.logs import JsonFormatter, RequestIdFilter
from tta_server.observability.request_id import current_request_id
from tta_server.settings import Settings


@pytest.fixture
def app_client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)

    @app.get("/boom", include_in_schema=False)
    async def boom() -> None:
        logging.getLogger("tta_server.test").warning("about to fail")
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_generated_when_absent_echoed_when_sane(app_client: TestClient) -> None:
    r = app_client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert app_client.get("/healthz").headers["x-request-id"] != r.headers["x-request-id"]
    r = app_client.get("/healthz", headers={"X-Request-ID": "trace-7f:abc/1"})
    assert r.headers["x-request-id"] == "trace-7f:abc/1"
    for insane in ("x" * 129, "two words", "tab\there", ""):
        r = app_client.get("/healthz", headers={"X-Request-ID": insane})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), insane


def test_in_error_bodies_of_every_kind(app_client: TestClient) -> None:
    for method, path in (("GET", "/v1/streams/nope"), ("GET", "/v1/nothing"), ("POST", "/healthz")):
        r = app_client.request(method, path, headers={"X-Request-ID": "req-1"})
        assert r.status_code in (404, 405)
        assert r.json()["error"]["request_id"] == "req-1" == r.headers["x-request-id"]
    r = app_client.post("/v1/streams", json={"model": 3})
    assert r.status_code == 422 and r.json()["error"]["request_id"] == r.headers["x-request-id"]
    r = app_client.get("/boom")
    assert r.status_code == 500 and r.json()["error"]["request_id"] == r.headers["x-request-id"]


def test_every_log_line_of_a_request_names_it(app_client: TestClient, settings: Settings) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        r = app_client.get("/boom", headers={"X-Request-ID": "failing-1"})
    finally:
        root.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ours = [line for line in lines if line["logger"] in ("tta_server.test", "tta_server.app")]
    assert {line["message"] for line in ours} >= {"about to fail", "unhandled error"}
    assert all(line["request_id"] == "failing-1" == r.headers["x-request-id"] for line in ours)
    assert any(line["exception"] and "RuntimeError: boom" in line["exception"] for line in ours)


def test_the_id_reaches_the_model_worker_thread(app_client: TestClient) -> None:
    batcher = app_client.app.state.services.streams.batcher  # type: ignore[attr-defined]
    seen: list[str | None] = []
    run = batcher._run_jobs

    def spy(*args: object) -> object:
        seen.append(current_request_id())
        return run(*args)

    batcher._run_jobs = spy
    r = app_client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "rid"})
    assert r.status_code == 201
    images = random_images(2)
    r = app_client.post("/v1/streams/rid/predict", content=npy_bytes(images), headers={**NPY, "X-Request-ID": "p-1"})
    assert r.status_code == 200 and seen == ["p-1"]
    assert np.asarray(r.json()["predictions"]).size == 2


def test_fresh_ids_are_unique_across_threads_and_processes() -> None:
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from tta_server.observability.request_id import new_request_id

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: new_request_id(), range(20_000)))
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids[:100])
    code = "from tta_server.observability.request_id import new_request_id; print(new_request_id())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", other)
    assert other[:16] != ids[0][:16]  # another process (a replica, a restart) draws another prefix
