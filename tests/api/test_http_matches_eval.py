"""End to end: a corrupted CIFAR-10 stream sent over HTTP scores exactly what `tta-server eval` scores.

Other streams of the same method send traffic at the same time, so the stream's batches are
fused with theirs (one forward pass, statistics per stream): fusion must change nothing.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.data.datasets import LabeledImages, load_labeled_images
from tta_server.evaluation.harness import EvalSpec, run_eval, subset
from tta_server.shift.cache import CorruptedSets
from tta_server.shift.domains import Domain
from tta_server.shift.streams import CorruptionStream, Setting


@pytest.mark.parametrize("method", ["bn", "unmix_tns"])
def test_http_stream_accuracy_equals_eval(client: TestClient, shared_dir: Path, tmp_path: Path, method: str) -> None:
    data_path = shared_dir / "data" / "cifar10_test_first846.npz"
    spec = EvalSpec(
        model="resnet20",
        method=method,
        data=data_path,
        models_dir=shared_dir / "models",
        setting=Setting.IID,
        batch_size=32,
        severity=5,
        corruptions=("contrast",),
        limit=256,
        seed=3,
        cache_dir=tmp_path,
        persistent_cache=False,
    )
    expected = run_eval(spec)

    data = subset(load_labeled_images(data_path), spec.limit, spec.seed)
    created = client.post("/v1/streams", json={"model": "resnet20", "method": method, "stream_id": "e2e", "seed": 3})
    assert created.status_code == 201, created.text
    stop = threading.Event()

    def neighbour(name: str, seed: int) -> None:
        assert (
            client.post("/v1/streams", json={"model": "resnet20", "method": method, "stream_id": name}).status_code
            == 201
        )
        i = 0
        while not stop.is_set() and i < 500:
            body = npy_bytes(random_images(1 + i % 3, seed=seed + i))
            assert client.post(f"/v1/streams/{name}/predict", content=body, headers=NPY).status_code == 200
            i += 1

    neighbours = [threading.Thread(target=neighbour, args=(f"n{k}", 100 * k)) for k in range(3)]
    for thread in neighbours:
        thread.start()
    correct = seen = 0
    try:
        correct, seen = send_stream(client, data, spec, tmp_path)
    finally:
        stop.set()
        for thread in neighbours:
            thread.join(timeout=120)
    assert seen == expected.n_images == 256
    assert correct == expected.domains[0].correct
    assert client.get("/v1/streams/e2e").json()["steps"] == expected.n_batches
    metrics = client.get("/metrics").text
    alone = float(re.search(r'^tta_batch_streams_bucket\{le="1.0"\} (\S+)$', metrics, re.M).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"^tta_batch_streams_count (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    assert total > alone, "no batch was fused: the test did not exercise fusion"


def send_stream(client: TestClient, data: LabeledImages, spec: EvalSpec, tmp_path: Path) -> tuple[int, int]:
    """Send the eval stream batch by batch to stream ``e2e``; (correct, seen)."""
    correct = seen = 0
    with CorruptedSets(data, spec.seed, tmp_path, persistent=False) as sets:
        stream = CorruptionStream(spec.setting, [Domain("contrast", 5)], data.y, sets, spec.batch_size, spec.seed)
        for batch in stream:
            r = client.post("/v1/streams/e2e/predict", content=npy_bytes(batch.x), headers=NPY)
            assert r.status_code == 200, r.text
            labels = np.array([p["label"] for p in r.json()["predictions"]])
            correct += int((labels == batch.y).sum())
            seen += len(labels)
    return correct, seen
