from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.api.deps import Services
from tta_server.app import create_app
from tta_server.serving.batcher import Job, JobResults
from tta_server.serving.model_worker import BatchOutput
from tta_server.settings import Settings


def wait_for_metric(client: TestClient, name: str, seconds: float = 30.0) -> str:
    """/metrics once ``name`` appears in it (deferred observers run just after the answer)."""
    deadline = time.monotonic() + seconds
    while True:
        text: str = client.get("/metrics").text
        if name in text or time.monotonic() > deadline:
            return text
        time.sleep(0.01)


def test_metrics_exported_in_base_units(client: TestClient) -> None:
    client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "m"})
    client.post("/v1/streams/m/predict", content=npy_bytes(random_images(4)), headers=NPY)
    text = wait_for_metric(client, "tta_bn_statistics_shift_bucket")  # drift is observed after the answer
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
    """One request running, one waiting (max_queue = 1): the next two are refused with 429."""
    # inline off: the first request's batch must run on the worker while the loop takes the others
    app = create_app(settings.model_copy(update={"max_queue": 1, "max_delay_ms": 0, "inline_max_images": 0}))
    services: Services = app.state.services
    release, running = threading.Event(), threading.Event()
    original = services.streams.worker.run_jobs

    def slow(jobs: Sequence[Job]) -> JobResults[BatchOutput]:
        running.set()
        release.wait(30)
        return original(jobs)

    services.streams.batcher._run_jobs = slow
    with TestClient(app) as c:
        c.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "q"})
        body = npy_bytes(random_images(1))
        batcher = services.streams.batcher
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(c.post, "/v1/streams/q/predict", content=body, headers=NPY)
            assert running.wait(30), "the first request never started"
            second = pool.submit(c.post, "/v1/streams/q/predict", content=body, headers=NPY)
            for _ in range(1500):  # wait until the second request holds the one queue slot
                if batcher.depth == 1:
                    break
                threading.Event().wait(0.02)
            assert batcher.depth == 1
            refused = [c.post("/v1/streams/q/predict", content=body, headers=NPY) for _ in range(2)]
            release.set()
            responses = [first.result(), second.result(), *refused]
        statuses = [r.status_code for r in responses]
        assert statuses == [200, 200, 429, 429], statuses
        rejected = refused[0]
        assert int(rejected.headers["Retry-After"]) >= 1 and rejected.json()["error"]["code"] == "queue_full"
        assert c.get("/v1/streams/q").json()["steps"] == 2
        assert "tta_queue_rejections_total 2.0" in c.get("/metrics").text
