"""Fused batches on CUDA over HTTP: streams served together answer what they answer alone.

Skipped without a CUDA device. Several streams of one method post at the same time to a
server with fusion on (their segments share one forward pass, one pinned host-to-device copy
and one device-to-host copy of the probabilities); the same requests go one stream at a time
to a server with fusion off. Every stream's probabilities and top-1 labels must agree, round
after round, so the adapted states agree too.
"""

from __future__ import annotations

import re
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.app import create_app
from tta_server.settings import Settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STREAMS = 6
ROUNDS = 3


def _images(stream: int, round_: int) -> bytes:
    """Different data and batch sizes per stream, one extreme (constant) stream among them."""
    images = random_images(1 + stream % 4, seed=100 * stream + round_)
    if stream == 0:
        images[:] = 255
    return npy_bytes(images)


def _serve(settings: Settings, method: str, fuse: bool) -> tuple[dict[tuple[int, int], list[list[float]]], str]:
    """Every stream's probabilities per round, and the /metrics text at the end."""
    answers: dict[tuple[int, int], list[list[float]]] = {}
    app = create_app(settings.model_copy(update={"device": "cuda", "fuse_streams": fuse, "max_delay_ms": 50.0}))
    with TestClient(app) as c:
        for s in range(STREAMS):
            r = c.post("/v1/streams", json={"model": "resnet20", "method": method, "stream_id": f"s{s}"})
            assert r.status_code == 201, r.text

        def send(s: int, round_: int) -> None:
            r = c.post(f"/v1/streams/s{s}/predict", content=_images(s, round_), headers=NPY)
            assert r.status_code == 200, r.text
            answers[(s, round_)] = [[t["probability"] for t in p["top_k"]] for p in r.json()["predictions"]]

        for round_ in range(ROUNDS):
            if fuse:
                threads = [threading.Thread(target=send, args=(s, round_)) for s in range(STREAMS)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                for s in range(STREAMS):
                    send(s, round_)
        metrics = c.get("/metrics").text
    return answers, metrics


@pytest.mark.parametrize("method", ["source", "bn", "alpha_bn", "unmix_tns", "tent"])
def test_fused_http_on_cuda_matches_streams_alone(settings: Settings, method: str) -> None:
    alone, _ = _serve(settings, method, fuse=False)
    fused, metrics = _serve(settings, method, fuse=True)
    assert fused.keys() == alone.keys()
    for key in alone:
        assert torch.allclose(torch.tensor(fused[key]), torch.tensor(alone[key]), atol=1e-4), key
    count = re.search(r"^tta_batch_streams_count (\S+)$", metrics, re.M)
    total = re.search(r"^tta_batch_streams_sum (\S+)$", metrics, re.M)
    assert count and total and float(total[1]) > float(count[1]), "no batch fused two streams"
