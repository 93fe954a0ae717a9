"""An `auto` stream shows its regime: in the predict response, in /drift and as a switch counter."""

from __future__ import annotations

import itertools
import time

from fastapi.testclient import TestClient

from adapters.auto import REGIME_NAMES
from tests.api.helpers import NPY, npy_bytes, random_images


def test_auto_regime_is_visible(client: TestClient) -> None:
    body = {"model": "resnet20", "method": "auto", "stream_id": "a"}
    assert client.post("/v1/streams", json=body).status_code == 201
    regimes = []
    for seed, n in enumerate([1, 1, 32, 32, 1]):
        r = client.post("/v1/streams/a/predict", content=npy_bytes(random_images(n, seed=seed)), headers=NPY)
        assert r.status_code == 200, r.text
        regimes.append(r.json()["regime"])
    assert set(regimes) <= set(REGIME_NAMES.values())
    assert regimes[0] == "components"  # a single image never uses batch statistics
    deadline = time.monotonic() + 5  # drift is recorded after the answer
    while client.get("/v1/streams/a/drift").json()["regime"] != regimes[-1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/v1/streams/a/drift").json()["regime"] == regimes[-1]
    metrics = client.get("/metrics").text
    switches = sum(a != b for a, b in itertools.pairwise(regimes))
    counted = sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("tta_auto_switches_total{")
    )
    assert counted == switches
    assert "stream" not in "".join(line for line in metrics.splitlines() if line.startswith("tta_auto_switches"))


def test_other_methods_have_no_regime(client: TestClient) -> None:
    assert client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "b"}).status_code == 201
    r = client.post("/v1/streams/b/predict", content=npy_bytes(random_images(2)), headers=NPY)
    assert r.json()["regime"] is None
