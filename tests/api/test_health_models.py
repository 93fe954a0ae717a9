from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tta_server.app import create_app
from tta_server.settings import Settings


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_when_models_loaded(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and body["models_loaded"] == ["resnet20"] and body["store_ok"] is True


def test_readyz_not_ready_when_a_model_fails(tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path, device="cpu")
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "not_ready"
    assert "model 'resnet20' failed to load" in r.json()["problems"][0]


def test_models_lists_catalogue_with_transform_and_hash(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    r20 = models["resnet20"]
    assert r20["arch"] == "cifar_resnet20" and r20["norm"] == "bn" and r20["num_classes"] == 10
    assert r20["classes"][0] == "airplane" and r20["input_size"] == 32
    assert r20["mean"] == [0.485, 0.456, 0.406] and r20["std"] == [0.229, 0.224, 0.225]
    assert r20["weights_sha256"].startswith("12fca82f") and r20["clean_top1"] == 0.8103
    assert r20["available"] and r20["loaded"]
    assert not models["resnet56"]["loaded"]


def test_unknown_route_uses_error_shape(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = client.post("/healthz")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_openapi_documents_every_route_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/streams",
        "/v1/streams/{stream_id}",
        "/v1/streams/{stream_id}/predict",
        "/v1/streams/{stream_id}/reset",
        "/v1/streams/{stream_id}/state",
        "/v1/streams/{stream_id}/parameters",
        "/v1/streams/{stream_id}/drift",
        "/v1/models",
        "/v1/methods",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    predict = paths["/v1/streams/{stream_id}/predict"]["post"]
    assert {"multipart/form-data", "application/json", "application/x-npy"} <= set(predict["requestBody"]["content"])
    assert "429" in predict["responses"] and "413" in predict["responses"]
    create = paths["/v1/streams"]["post"]["requestBody"]["content"]["application/json"]
    assert "examples" in create
