"""The metrics registry: process and build collectors, label names, series that exist from the start."""

from __future__ import annotations

import platform
import re

import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tta_server.metrics import STORE_OPERATIONS, Metrics


def samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of everything the registry exposes."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_process_and_platform_collectors_are_in_the_apps_registry() -> None:
    exposed = samples(Metrics())
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "python_info"):
        assert name in exposed, name
    assert exposed["process_resident_memory_bytes"][0][1] > 0


def test_build_info_names_server_python_and_torch() -> None:
    ((labels, value),) = samples(Metrics())["tta_build_info"]
    assert value == 1
    assert labels["python"] == platform.python_version()
    assert labels["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert re.fullmatch(r"\d+\.\d+\.\d+.*|unknown", labels["version"])


def test_two_registries_in_one_process_do_not_collide() -> None:
    first, second = Metrics(), Metrics()
    assert "process_open_fds" in samples(first) and "process_open_fds" in samples(second)


def test_http_verb_label_is_http_method_and_positional_calls_still_work() -> None:
    metrics = Metrics()
    metrics.requests.labels("/v1/models", "GET", "200").inc()
    metrics.latency.labels("/v1/models", "GET").observe(0.01)
    exposed = samples(metrics)
    ((labels, value),) = exposed["tta_http_requests_total"]
    assert labels == {"route": "/v1/models", "http_method": "GET", "status": "200"} and value == 1
    assert all("method" not in labels for labels, _ in exposed["tta_http_request_duration_seconds_count"])


def test_store_errors_exist_at_zero_for_every_known_operation() -> None:
    exposed = samples(Metrics())
    series = {labels["operation"]: value for labels, value in exposed["tta_store_errors_total"]}
    assert series == dict.fromkeys(STORE_OPERATIONS, 0.0)
    assert exposed["tta_queue_rejections_total"] == [({}, 0.0)]
    assert exposed["tta_deadline_exceeded_total"] == [({}, 0.0)]


def test_the_server_exposes_them_on_metrics(client: TestClient) -> None:
    client.get("/v1/models")
    text = client.get("/metrics").text
    assert 'tta_http_requests_total{http_method="GET",route="/v1/models",status="200"} 1.0' in text
    assert "process_resident_memory_bytes" in text and "tta_build_info{" in text
    assert 'tta_store_errors_total{operation="save_state"} 0.0' in text
