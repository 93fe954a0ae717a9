"""Backup and restore for every method: a stream's own export re-imports and continues exactly.

States are exported after 0, 1 and several steps (CEMA with a filled replay buffer, SAR before
its first loss value), imported into the same stream and into a fresh one with the same seed,
and the next step of each must equal the original's. Imports that do not fit answer 422 naming
the problem and leave the stream untouched.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from adapters.registry import method_names
from adapters.serialize import state_from_bytes, state_to_bytes
from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.app import create_app
from tta_server.auth import DEFAULT_TENANT
from tta_server.settings import Settings
from tta_server.state.base import StreamKey

CONFIGS: dict[str, dict[str, Any]] = {
    # small buffers so that a few steps fill CEMA's upload and replay FIFOs
    "cema": {"cloud_batch_size": 4, "replay_start": 4, "replay_buffer_size": 16, "d_margin": None},
}


@pytest.fixture(scope="module")
def client(shared_dir: Any) -> Iterator[TestClient]:
    settings = Settings(
        models_dir=shared_dir / "models", data_dir=shared_dir / "data", device="cpu", drift_sample_every=0
    )
    with TestClient(create_app(settings)) as c:
        yield c


def create(client: TestClient, stream_id: str, method: str) -> None:
    body = {"model": "resnet20", "method": method, "stream_id": stream_id, "config": CONFIGS.get(method, {})}
    r = client.post("/v1/streams", json=body)
    assert r.status_code == 201, r.text


def step(client: TestClient, stream_id: str, seed: int) -> list[list[float]]:
    r = client.post(f"/v1/streams/{stream_id}/predict", content=npy_bytes(random_images(4, seed=seed)), headers=NPY)
    assert r.status_code == 200, r.text
    return [[t["probability"] for t in p["top_k"]] for p in r.json()["predictions"]]


def export(client: TestClient, stream_id: str) -> bytes:
    r = client.get(f"/v1/streams/{stream_id}/state")
    assert r.status_code == 200, r.text
    return bytes(r.content)


def same_state(a: bytes, b: bytes) -> None:
    left, right = state_from_bytes(a), state_from_bytes(b)
    assert left.meta.step == right.meta.step and left.meta.config == right.meta.config
    assert left.tensors.keys() == right.tensors.keys()
    # Adam divides by the root of tiny second moments, so float rounding of a reloaded state shows
    # up to ~1e-6 in moments; a real divergence is orders of magnitude larger
    for name, value in left.tensors.items():
        other = right.tensors[name]
        diff = (value.double() - other.double()).abs().nan_to_num(0.0).max() if value.numel() else 0.0
        assert torch.allclose(value.double(), other.double(), rtol=1e-5, atol=1e-5, equal_nan=True), (name, diff)


@pytest.mark.parametrize("method", method_names())
def test_every_method_restores_its_own_backup_and_continues_exactly(client: TestClient, method: str) -> None:
    original, copy = f"{method}-orig", f"{method}-copy"
    create(client, original, method)
    seed = 0
    for steps in (0, 1, 6):
        while state_from_bytes(export(client, original)).meta.step < steps:
            step(client, original, seed)
            seed += 1
        backup = export(client, original)
        own = client.put(f"/v1/streams/{original}/state", content=backup)
        assert own.status_code == 200, (steps, own.text)
        create(client, f"{copy}-{steps}", method)
        restored = client.put(f"/v1/streams/{copy}-{steps}/state", content=backup)
        assert restored.status_code == 200, (steps, restored.text)
        assert restored.json()["step"] == state_from_bytes(backup).meta.step
        # both continue with the same batch: same predictions, same next state
        want, got = step(client, original, seed), step(client, f"{copy}-{steps}", seed)
        seed += 1
        assert torch.allclose(torch.tensor(want), torch.tensor(got), atol=1e-5), (method, steps)
        same_state(export(client, original), export(client, f"{copy}-{steps}"))


def raw_metadata(blob: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", blob[:8])
    meta: dict[str, str] = json.loads(blob[8 : 8 + length])["__metadata__"]
    return meta


def test_imports_that_do_not_fit_answer_422_naming_the_problem(client: TestClient) -> None:
    create(client, "bad-target", "tent")
    step(client, "bad-target", 0)
    before = client.get("/v1/streams/bad-target").json()
    good = export(client, "bad-target")
    state = state_from_bytes(good)
    meta = raw_metadata(good)
    # a floating-point tensor (NaN and magnitude cases need one), chosen by name: safetensors' load
    # returns the tensors in an order that varies with the hash seed, and tent's state holds integer ones too
    name = min(k for k, v in state.tensors.items() if v.is_floating_point())
    tensors = dict(state.tensors)

    def with_tensors(**changes: torch.Tensor) -> bytes:
        return save({**tensors, **changes}, metadata=meta)

    renamed = {("x" + k if k == name else k): v for k, v in tensors.items()}
    nan = tensors[name].clone()
    nan.view(-1)[0] = float("nan")
    huge = tensors[name].clone()
    huge.view(-1)[0] = 1e38
    cases: list[tuple[bytes, str]] = [
        (save(renamed, metadata=meta), "missing"),
        (with_tensors(**{name: torch.zeros(3)}), name),
        (with_tensors(**{name: tensors[name].double()}), name),
        (with_tensors(**{name: nan}), "NaN"),
        (with_tensors(**{name: huge}), "magnitude"),
        (save(tensors, metadata={**meta, "step": "-5"}), "step"),
        (save(tensors, metadata={**meta, "step": "1e30"}), "step"),
        (save(tensors, metadata={**meta, "step": "9" * 19}), "step"),
        (save(tensors, metadata={**meta, "extra": '{"anything": [1, 2]}'}), "extra"),
        (save(tensors, metadata={**meta, "extra": "[1]"}), "extra"),
        (save(tensors, metadata={**meta, "surprise": "1"}), "surprise"),
        (save(tensors, metadata={**meta, "seed": "7"}), "seed"),
        (good[:40], "malformed"),
        (struct.pack("<Q", 5) + b"[1,2]" + good[13:], "JSON object"),
        (good.replace(b'"F32"', b'"X32"', 1), "malformed"),
        (state_to_bytes(state)[:8] + b"[" + state_to_bytes(state)[9:], "malformed"),
    ]
    for blob, needle in cases:
        r = client.put("/v1/streams/bad-target/state", content=blob)
        assert r.status_code == 422, (needle, r.text)
        assert needle in r.json()["error"]["message"], (needle, r.text)
    after = client.get("/v1/streams/bad-target").json()
    assert (after["version"], after["steps"]) == (before["version"], before["steps"])


def test_an_import_keeps_the_methods_own_tensor_order(client: TestClient) -> None:
    """Whatever order safetensors reads the tensors back in (it varies between processes), the restored
    stream continues with the method's own order (SAR's gradient norm sums over it)."""
    create(client, "order", "sar")
    step(client, "order", 0)
    backup = export(client, "order")
    assert client.put("/v1/streams/order/state", content=backup).status_code == 200
    services = client.app.state.services  # type: ignore[attr-defined]
    record = services.streams.store.get_stream(StreamKey(DEFAULT_TENANT, "order"))
    setup = services.streams.worker._setup_of(record)
    fresh = setup.adapter.init_state(setup.model, record.seed, setup.loaded.sha256)
    stored = services.streams.store.load_state(record.key)
    assert list(stored.state.tensors) == list(fresh.tensors)
