from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi.testclient import TestClient

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.api.deps import Services
from tta_server.app import create_app
from tta_server.serving.model_worker import BatchOutput
from tta_server.settings import Settings
from tta_server.state.base import StreamRecord


def test_metrics_exported_in_base_units(client: TestClient) -> None:
    client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "m"})
    client.post("/v1/streams/m/predict", content=npy_bytes(random_images(4)), headers=NPY)
    text = client.get("/metrics").text
    for name in (
        'tta_http_requests_total{http_method="POST",route="/v1/streams/{stream_id}/predict",status="200"} 1.0',
        "tta_http_request_duration_seconds_bucket",
        "tta_queue_depth 0.0",
        "tta_batch_images_bucket",
        'tta_inference_duration_seconds_count{method="bn",model="resnet20"} 1.0',
        'tta_adaptation_steps_total{method="bn",model="resnet20"} 1.0',
        'tta_images_total{method="bn",model="resnet20"} 4.0',
        "tta_active_streams 1.0",
        "tta_prediction_entropy_nats_bucket",
        "tta_source_disagreement_ratio_bucket",
        "tta_bn_statistics_shift_bucket",
    ):
        assert name in text, name
    assert "stream_id=" not in text.replace('route="/v1/streams/{stream_id}', "")


def test_full_queue_answers_429_with_retry_after(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"max_queue": 1, "max_delay_ms": 0}))
    services: Services = app.state.services
    release = threading.Event()
    original = services.streams.worker.run_batch

    def slow(record: StreamRecord, images: np.ndarray, adapt: bool) -> BatchOutput:
        release.wait(10)
        return original(record, images, adapt)

    services.streams.batcher._run_batch = slow
    with TestClient(app) as c:
        c.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "q"})
        body = npy_bytes(random_images(1))
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(c.post, "/v1/streams/q/predict", content=body, headers=NPY) for _ in range(4)]
            for _ in range(250):  # wait until the two surplus requests have been refused
                if sum(f.done() for f in futures) == 2:
                    break
                threading.Event().wait(0.02)
            release.set()
            responses = [f.result() for f in futures]
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) == 2 and statuses.count(429) == 2, statuses
        rejected = next(r for r in responses if r.status_code == 429)
        assert int(rejected.headers["Retry-After"]) >= 1 and rejected.json()["error"]["code"] == "queue_full"
        assert c.get("/v1/streams/q").json()["steps"] == 2
        assert "tta_queue_rejections_total 2.0" in c.get("/metrics").text
