"""The ``.npy`` predict fast path: which requests it serves, and that its answers are the route's."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.api.fast_predict import FastPredict, parse_query
from tta_server.app import create_app, error_response
from tta_server.settings import Settings


def scope(headers: dict[str, str], path: str = "/v1/streams/cam/predict", query: bytes = b"") -> dict[str, Any]:
    """An HTTP scope as uvicorn builds it (lower-case byte header names)."""
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": "POST", "path": path, "query_string": query, "headers": raw}


@pytest.fixture
def fast(settings: Settings) -> FastPredict:
    app = create_app(settings.model_copy(update={"api_keys": {"k1": "acme"}}))
    return FastPredict(app.state.services, error_response)


def test_query_parsing_takes_only_plain_values() -> None:
    assert parse_query(b"") == (True, 5)
    assert parse_query(b"adapt=false&top_k=3") == (False, 3)
    assert parse_query(b"adapt=1") == (True, 5)
    for handed_over in (b"adapt=yes", b"top_k=0", b"top_k=1001", b"top_k=%EF%BC%93", b"top_k=1&top_k=2", b"x=1"):
        assert parse_query(handed_over) is None, handed_over


def test_serves_only_keyed_npy_posts(fast: FastPredict) -> None:
    ok = {"content-type": "application/x-npy", "authorization": "Bearer k1"}
    served = fast._ours(scope(ok))
    assert served is not None
    key, adapt, top_k, _ = served
    assert (key.tenant, key.stream_id, adapt, top_k) == ("acme", "cam", True, 5)
    handed_over = [
        scope({"content-type": "multipart/form-data; boundary=x", "authorization": "Bearer k1"}),
        scope({"content-type": "application/json", "authorization": "Bearer k1"}),
        scope({"content-type": "application/x-npy"}),  # no key: the route answers the 401
        scope({"content-type": "application/x-npy", "authorization": "Bearer nope"}),
        scope(ok | {"x-tenant": "bad/tenant"}),
        scope(ok, query=b"adapt=maybe"),
        scope(ok, path="/v1/streams/cam/predict/extra"),
        scope(ok, path="/v1/streams"),
    ]
    for s in handed_over:
        assert fast._ours(s) is None, s
    get = scope(ok) | {"method": "GET"}
    assert fast._ours(get) is None


def test_answers_match_the_route(client: TestClient) -> None:
    """The same images on two identical streams: one served by the fast path, one by the route
    (``adapt=yes`` is valid for the route but not plain enough for the fast path)."""
    for sid in ("fast", "route"):
        created = client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": sid})
        assert created.status_code == 201
    for seed in range(3):
        body = npy_bytes(random_images(4, seed=seed))
        fast = client.post("/v1/streams/fast/predict?top_k=3", content=body, headers=NPY)
        route = client.post("/v1/streams/route/predict?top_k=3&adapt=yes", content=body, headers=NPY)
        assert fast.status_code == route.status_code == 200
        assert fast.headers["content-type"] == route.headers["content-type"] == "application/json"
        assert fast.headers["x-request-id"]
        assert {**fast.json(), "stream_id": "route"} == route.json()


def test_errors_have_the_route_shape(client: TestClient) -> None:
    missing = client.post("/v1/streams/nobody/predict", content=npy_bytes(random_images(1)), headers=NPY)
    via_route = client.post("/v1/streams/nobody/predict?adapt=yes", content=npy_bytes(random_images(1)), headers=NPY)
    assert missing.status_code == via_route.status_code == 404
    assert missing.json()["error"]["code"] == via_route.json()["error"]["code"] == "not_found"
    assert missing.json()["error"]["request_id"] == missing.headers["x-request-id"]
    client.post("/v1/streams", json={"model": "resnet20", "method": "source", "stream_id": "s"})
    broken = client.post("/v1/streams/s/predict", content=b"\x93NUMPY broken", headers=NPY)
    assert broken.status_code == 422 and broken.json()["error"]["code"] == "validation_error"
    metrics = client.get("/metrics").text
    assert 'route="/v1/streams/{stream_id}/predict"' in metrics
    assert "/v1/streams/nobody" not in metrics  # the template, never a stream id


def counted(client: TestClient, status: str) -> float:
    """``tta_http_requests_total`` of the predict route for ``status`` (0 before the first)."""
    metrics = client.app.state.services.metrics  # type: ignore[attr-defined]
    value = metrics.registry.get_sample_value(
        "tta_http_requests_total", {"route": "/v1/streams/{stream_id}/predict", "http_method": "POST", "status": status}
    )
    return float(value or 0.0)


def test_request_ids_metrics_and_faults(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    client.post("/v1/streams", json={"model": "resnet20", "method": "source", "stream_id": "s"})
    body = npy_bytes(random_images(1))
    before = counted(client, "200")
    r = client.post("/v1/streams/s/predict", content=body, headers={**NPY, "X-Request-ID": "cam-7:frame-19"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "cam-7:frame-19"
    fresh = client.post("/v1/streams/s/predict", content=body, headers={**NPY, "X-Request-ID": "bad id\x01"})
    assert fresh.headers["x-request-id"] != "bad id\x01" and len(fresh.headers["x-request-id"]) == 32
    not_ascii = client.post("/v1/streams/s/predict", content=body, headers={**NPY, "X-Request-ID": b"cam-\xff"})
    assert not_ascii.status_code == 200 and len(not_ascii.headers["x-request-id"]) == 32
    twice = [*NPY.items(), ("X-Request-ID", "one"), ("X-Request-ID", "two")]  # handed to the route: same answer
    assert client.post("/v1/streams/s/predict", content=body, headers=twice).status_code == 200
    assert counted(client, "200") == before + 4

    async def broken(*_: object) -> None:
        raise RuntimeError("boom at 0x7f00deadbeef")

    monkeypatch.setattr(client.app.state.services.streams, "predict", broken)  # type: ignore[attr-defined]
    fault = client.post("/v1/streams/s/predict", content=body, headers={**NPY, "X-Request-ID": "f-1"})
    assert fault.status_code == 500 and fault.headers["x-request-id"] == "f-1"
    assert fault.json()["error"] == {
        "code": "internal_error",
        "message": "internal error: RuntimeError",
        "detail": None,
        "request_id": "f-1",
    }
    assert counted(client, "500") == 1
