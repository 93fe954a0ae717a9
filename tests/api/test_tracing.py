"""OpenTelemetry spans of one predict request, with the SDK's in-memory exporter; no-op when off."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.app import create_app
from tta_server.observability import tracing
from tta_server.settings import Settings

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def traced(settings: Settings) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(settings)  # tracing "auto" without OTEL_* variables: off until the provider below
    tracing.use_provider(provider)
    try:
        with TestClient(app) as client:
            yield client, exporter
    finally:
        tracing.use_provider(None)


def test_one_predict_request_gives_the_span_tree(traced: tuple[TestClient, InMemorySpanExporter]) -> None:
    client, exporter = traced
    assert client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "t"}).status_code == 201
    exporter.clear()
    headers = {**NPY, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "X-Request-ID": "traced-1"}
    r = client.post("/v1/streams/t/predict", content=npy_bytes(random_images(3)), headers=headers)
    assert r.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request = spans["POST /v1/streams/{stream_id}/predict"]
    assert set(spans) == {request.name, "tta.decode", "tta.queue_wait", "tta.batch", "tta.step", "tta.store.write"}
    assert request.parent is not None and format(request.parent.span_id, "016x") == CALLER_SPAN
    assert all(s.context is not None and format(s.context.trace_id, "032x") == CALLER_TRACE for s in spans.values())

    def parent_of(name: str) -> int | None:
        parent = spans[name].parent
        return parent.span_id if parent is not None else None

    def id_of(name: str) -> int | None:
        context = spans[name].context
        return context.span_id if context is not None else None

    for child in ("tta.decode", "tta.queue_wait", "tta.batch"):
        assert parent_of(child) == id_of(request.name), child
    for child in ("tta.step", "tta.store.write"):
        assert parent_of(child) == id_of("tta.batch"), child
    attributes = request.attributes or {}
    assert attributes["http.response.status_code"] == 200 and attributes["tta.request_id"] == "traced-1"
    assert spans["tta.queue_wait"].end_time <= spans["tta.batch"].start_time  # type: ignore[operator]

    exporter.clear()  # a dry run writes nothing: no store span
    r = client.post("/v1/streams/t/predict?adapt=false", content=npy_bytes(random_images(1)), headers=NPY)
    assert r.status_code == 200
    assert "tta.store.write" not in {s.name for s in exporter.get_finished_spans()}


def test_off_is_a_shared_no_op_and_needs_no_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    tracing.use_provider(None)
    assert tracing.span("x") is tracing.span("y")  # one shared null context, nothing allocated
    assert not tracing.configure("auto", {})
    assert not tracing.configure("on", {"OTEL_SDK_DISABLED": "true"})
    assert tracing.wanted("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert not tracing.wanted("auto", {"OTEL_TRACES_EXPORTER": "none"})
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if the otel extra were not installed
    assert not tracing.configure("auto", {"OTEL_TRACES_EXPORTER": "console"})
    with pytest.raises(RuntimeError, match="otel extra"):
        tracing.configure("on", {})
    assert not tracing.enabled()


def test_console_exporter_from_the_standard_variables() -> None:
    try:
        assert tracing.configure("auto", {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "cam-site"})
        assert tracing.enabled()
    finally:
        tracing.configure("off", {})
    assert not tracing.enabled()
