"""The grad mode of a step: forward-only methods under ``torch.inference_mode``, gradient methods with autograd.

The mode shows in the state a step writes: a forward-only step's new tensors are inference
tensors, a gradient step's are not. The states of both kinds keep working afterwards (the
round-trip tests export, import and reset every method's state).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.app import create_app
from tta_server.auth import DEFAULT_TENANT
from tta_server.serving.model_worker import FORWARD_ONLY
from tta_server.settings import Settings
from tta_server.state.base import StreamKey


@pytest.mark.parametrize(("method", "forward_only"), [("unmix_tns", True), ("adab2n", True), ("tent", False)])
def test_forward_only_steps_run_in_inference_mode(settings: Settings, method: str, forward_only: bool) -> None:
    assert (method in FORWARD_ONLY) == forward_only
    app = create_app(settings.model_copy(update={"drift_sample_every": 0}))
    with TestClient(app) as client:
        created = client.post("/v1/streams", json={"model": "resnet20", "method": method, "stream_id": "m"})
        assert created.status_code == 201, created.text
        for seed in range(2):
            answer = client.post("/v1/streams/m/predict", content=npy_bytes(random_images(4, seed=seed)), headers=NPY)
            assert answer.status_code == 200, answer.text
        stored = app.state.services.streams.store.load_state(StreamKey(DEFAULT_TENANT, "m"))
        assert stored is not None and stored.state.tensors
        modes = {name: tensor.is_inference() for name, tensor in stored.state.tensors.items()}
        assert set(modes.values()) == {forward_only}, modes


def test_a_changed_registration_gets_its_own_setup(settings: Settings) -> None:
    """Setups are remembered per registration object; another config is another setup, never a stale one."""
    app = create_app(settings)
    with TestClient(app) as client:
        created = client.post(
            "/v1/streams",
            json={"model": "resnet20", "method": "alpha_bn", "stream_id": "a", "config": {"source_weight": 0.9}},
        )
        assert created.status_code == 201, created.text
        streams = app.state.services.streams
        record = streams.store.get_stream(StreamKey(DEFAULT_TENANT, "a"))
        first = streams.worker._setup_of(record)
        assert streams.worker._setup_of(record) is first
        changed = replace(record, config={**record.config, "source_weight": 0.7})
        other = streams.worker._setup_of(changed)
        assert other is not first
        assert other.adapter.config.source_weight == pytest.approx(0.7)
        assert streams.worker._setup_of(record) is first
