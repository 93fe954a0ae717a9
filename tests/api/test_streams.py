from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load, save_file

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.app import create_app
from tta_server.settings import Settings
from tta_server.zoo.resnet_cifar import cifar_resnet


def create(client: TestClient, **body: object) -> dict[str, object]:
    r = client.post("/v1/streams", json={"model": "resnet20", "method": "bn", **body})
    assert r.status_code == 201, r.text
    data: dict[str, object] = r.json()
    return data


def test_create_get_list_delete(client: TestClient) -> None:
    made = create(client, stream_id="cam-1", metadata={"site": "north"})
    assert made["stream_id"] == "cam-1" and made["steps"] == 0 and made["metadata"] == {"site": "north"}
    generated = create(client)
    assert isinstance(generated["stream_id"], str) and len(generated["stream_id"]) == 16
    page = client.get("/v1/streams", params={"limit": 1}).json()
    assert page["total"] == 2 and len(page["streams"]) == 1 and page["streams"][0]["stream_id"] == "cam-1"
    assert client.get("/v1/streams", params={"offset": 1}).json()["streams"][0]["stream_id"] == generated["stream_id"]
    got = client.get("/v1/streams/cam-1").json()
    assert got["model"] == "resnet20" and got["method"] == "bn" and got["drift"]["images"] == 0
    assert client.delete("/v1/streams/cam-1").status_code == 204
    r = client.get("/v1/streams/cam-1")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.delete("/v1/streams/cam-1").status_code == 404


def test_listing_and_describing_read_state_summaries_not_states(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    create(client, stream_id="busy", method="tent")
    create(client, stream_id="idle", method="tent")
    assert client.post("/v1/streams/busy/predict", content=npy_bytes(random_images(4)), headers=NPY).status_code == 200
    store = client.app.state.services.streams.store  # type: ignore[attr-defined]

    def no_blob(*_: object) -> None:
        raise AssertionError("a listing loaded a whole state")

    monkeypatch.setattr(store, "load_state", no_blob)
    listed = {s["stream_id"]: s for s in client.get("/v1/streams").json()["streams"]}
    busy, idle = listed["busy"], listed["idle"]
    assert (busy["steps"], busy["samples_seen"], busy["version"]) == (1, 4, 1) and busy["state_bytes"] > 0
    assert (idle["steps"], idle["samples_seen"], idle["version"], idle["state_bytes"]) == (0, 0, 0, 0)
    assert idle["updated_at"] is None and busy["updated_at"] > 0
    described = client.get("/v1/streams/busy").json()
    assert {k: described[k] for k in ("steps", "samples_seen", "version", "state_bytes")} == {
        k: busy[k] for k in ("steps", "samples_seen", "version", "state_bytes")
    }


def test_duplicate_id_is_409_and_changes_nothing(client: TestClient) -> None:
    create(client, stream_id="dup")
    r = client.post("/v1/streams", json={"model": "resnet20", "method": "source", "stream_id": "dup"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    assert client.get("/v1/streams/dup").json()["method"] == "bn"


def test_registration_errors_are_422_with_reasons(client: TestClient) -> None:
    cases = [
        ({"model": "nope", "method": "bn"}, "unknown model 'nope'"),
        ({"model": "resnet20", "method": "nope"}, "unknown method 'nope'"),
        ({"model": "resnet20", "method": "alpha_bn", "config": {"source_weight": 7}}, "source_weight"),
        ({"model": "resnet20", "method": "bn", "config": {"bogus": 1}}, "bogus"),
        ({"model": "resnet20", "method": "bn", "stream_id": "bad id!"}, "stream_id"),
        ({"model": "resnet20"}, "method"),
    ]
    for body, needle in cases:
        r = client.post("/v1/streams", json=body)
        assert r.status_code == 422, (body, r.text)
        error = r.json()["error"]
        assert error["code"] == "validation_error" and needle in error["message"] + str(error["detail"]), r.text
    assert client.get("/v1/streams").json()["total"] == 0


@pytest.fixture
def gn_client(settings: Settings, tmp_path: Path) -> Iterator[TestClient]:
    """A server whose catalogue has a GroupNorm model (a small untrained CIFAR ResNet)."""
    save_file(cifar_resnet(20, "gn").state_dict(), str(tmp_path / "gn.safetensors"))
    entry = {
        "name": "tiny-gn",
        "arch": "cifar_resnet20",
        "norm": "gn",
        "weights": "gn.safetensors",
        "classes": [str(i) for i in range(10)],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    (tmp_path / "models.json").write_text(json.dumps({"models": [entry]}))
    with TestClient(create_app(settings.model_copy(update={"model_config_file": tmp_path / "models.json"}))) as c:
        yield c


def test_method_that_cannot_adapt_the_norm_type_is_refused(gn_client: TestClient) -> None:
    methods = {m["name"]: m for m in gn_client.get("/v1/methods").json()["methods"]}
    bn_only = [name for name, m in methods.items() if m["supported_norms"] == ["bn"]]
    assert {"bn", "alpha_bn", "unmix_tns", "adab2n"} <= set(bn_only)
    for name in bn_only:
        r = gn_client.post("/v1/streams", json={"model": "tiny-gn", "method": name})
        assert r.status_code == 422, r.text
        assert f"method '{name}' adapts bn layers; the model has gn" in r.json()["error"]["message"]
    for name in ("source", "tent", "sar"):
        assert gn_client.post("/v1/streams", json={"model": "tiny-gn", "method": name}).status_code == 201
    assert gn_client.get("/v1/streams").json()["total"] == 3


def test_parameters_export_for_edge_devices(gn_client: TestClient) -> None:
    gn_client.post("/v1/streams", json={"model": "tiny-gn", "method": "tent", "stream_id": "edge"})
    before = gn_client.get("/v1/streams/edge/parameters")
    gn_client.post("/v1/streams/edge/predict", content=npy_bytes(random_images(8)), headers=NPY)
    after = gn_client.get("/v1/streams/edge/parameters")
    assert before.status_code == after.status_code == 200
    assert int(after.headers["x-parameters-version"]) > int(before.headers["x-parameters-version"])
    tensors = load(after.content)
    model = cifar_resnet(20, "gn")
    _, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and tensors and all(k.endswith(("weight", "bias")) for k in tensors)


def test_methods_list_schema_and_defaults(client: TestClient) -> None:
    methods = {m["name"]: m for m in client.get("/v1/methods").json()["methods"]}
    assert {"source", "bn"} <= set(methods)
    assert methods["bn"]["config_schema"]["type"] == "object"
    if "alpha_bn" in methods:
        assert methods["alpha_bn"]["defaults"]["source_weight"] == 0.9


def test_reset_and_state_round_trip(client: TestClient) -> None:
    create(client, stream_id="s", method="source")
    for _ in range(2):
        assert client.post("/v1/streams/s/predict", content=npy_bytes(random_images(2)), headers=NPY).status_code == 200
    exported = client.get("/v1/streams/s/state")
    assert exported.status_code == 200 and exported.headers["x-state-version"] == "2"
    imported = client.put("/v1/streams/s/state", content=exported.content)
    assert imported.status_code == 200 and imported.json() == {"stream_id": "s", "step": 2, "version": 3}
    reset = client.post("/v1/streams/s/reset").json()
    assert reset["version"] == 4


def test_state_import_rejects_foreign_or_broken_state(client: TestClient) -> None:
    create(client, stream_id="a", method="bn")
    create(client, stream_id="b", method="source")
    client.post("/v1/streams/a/predict", content=npy_bytes(random_images(2)), headers=NPY)
    foreign = client.get("/v1/streams/a/state").content
    before = client.get("/v1/streams/b").json()
    r = client.put("/v1/streams/b/state", content=foreign)
    assert r.status_code == 422 and "method 'bn'" in r.json()["error"]["message"]
    r = client.put("/v1/streams/b/state", content=b"not safetensors")
    assert r.status_code == 422 and "malformed" in r.json()["error"]["message"]
    assert client.get("/v1/streams/b").json() == before


def test_drift_endpoint_reports_windows(client: TestClient) -> None:
    create(client, stream_id="d")
    images = np.concatenate([random_images(8, seed=s) for s in range(3)])
    client.post("/v1/streams/d/predict", content=npy_bytes(images), headers=NPY)
    deadline = time.monotonic() + 30  # drift is observed just after the answer
    while (drift := client.get("/v1/streams/d/drift").json())["lifetime_images"] < 24 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert drift["short"]["images"] == 24 and drift["lifetime_images"] == 24
    assert 0 <= drift["short"]["entropy_mean"] <= np.log(10) + 1e-6
    assert 0 < drift["short"]["confidence_mean"] <= 1
    assert abs(sum(drift["short"]["class_distribution"]) - 1) < 1e-3
    # the first batch is sampled against the source model: disagreement and BN shift exist
    assert 0 <= drift["short"]["source_disagreement"] <= 1 and drift["short"]["bn_shift"] > 0
    assert client.get("/v1/streams/missing/drift").status_code == 404


def test_state_for_other_weights_is_refused_until_reset(client: TestClient) -> None:
    create(client, stream_id="w", method="bn")
    client.post("/v1/streams/w/predict", content=npy_bytes(random_images(2)), headers=NPY)
    store = client.app.state.services.streams.store  # type: ignore[attr-defined]
    key = store.get_stream(store.list_streams(None, 0, 10)[0][0].key).key
    stored = store.load_state(key)
    stale = stored.state.with_meta(model_hash="0" * 64)
    store.save_state(key, stale, stored.version, stored.samples_seen)
    r = client.post("/v1/streams/w/predict", content=npy_bytes(random_images(2)), headers=NPY)
    assert r.status_code == 422 and "state made for weights 000000000000" in r.json()["error"]["message"]
    assert client.post("/v1/streams/w/reset").status_code == 200
    assert client.post("/v1/streams/w/predict", content=npy_bytes(random_images(2)), headers=NPY).status_code == 200


def test_a_stream_description_names_the_weights_its_model_runs(client: TestClient) -> None:
    create(client, stream_id="hashed", method="bn")
    weights = client.get("/v1/models/resnet20").json()
    described = client.get("/v1/streams/hashed").json()
    listed = next(s for s in client.get("/v1/streams").json()["streams"] if s["stream_id"] == "hashed")
    assert described["model_sha256"] == listed["model_sha256"]
    assert described["model_sha256"] is not None and len(described["model_sha256"]) == 64
    assert described["model_sha256"] in str(weights)
