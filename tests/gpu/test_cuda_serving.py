"""The HTTP path on CUDA gives the CPU's predictions; skipped where no GPU is present."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.app import create_app
from tta_server.settings import Settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["source", "bn", "unmix_tns", "tent"])
def test_cuda_predictions_match_cpu(settings: Settings, method: str) -> None:
    results = {}
    for device in ("cpu", "cuda"):
        with TestClient(create_app(settings.model_copy(update={"device": device}))) as c:
            c.post("/v1/streams", json={"model": "resnet20", "method": method, "stream_id": "g"})
            probs = []
            for seed in range(3):
                r = c.post("/v1/streams/g/predict", content=npy_bytes(random_images(16, seed=seed)), headers=NPY)
                assert r.status_code == 200, r.text
                probs.append([p["probability"] for p in r.json()["predictions"]])
            results[device] = torch.tensor(probs)
    assert torch.allclose(results["cpu"], results["cuda"], atol=1e-3)
