"""``GET /v1/models/{name}``: hash, card, preprocessing and the methods that fit a model."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from safetensors.torch import save_file

from adapters import method_names
from tta_server.app import create_app
from tta_server.settings import Settings
from tta_server.zoo.catalogue import file_sha256
from tta_server.zoo.resnet_cifar import cifar_resnet

BN_ONLY = {"bn", "alpha_bn", "unmix_tns", "adab2n"}


def test_third_party_model_metadata(client: TestClient) -> None:
    r = client.get("/v1/models/resnet20")
    assert r.status_code == 200
    body = r.json()
    assert body["weights_sha256"] == body["weights_sha256_pinned"]
    assert body["weights_sha256"].startswith("12fca82f")
    assert body["card"] is None and body["problem"] is None
    assert body["preprocessing"] == {
        "input_size": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "resize_mode": "resize_crop",
        "pad_colour": [124, 116, 104],
        "exif_orientation": True,
        "resample": "bilinear",
    }
    assert body["norm"] == "bn" and body["norms"] == ["bn"]
    assert body["methods"] == method_names()
    assert all(f["fits"] and f["reason"] is None for f in body["method_fit"])
    assert body["loaded"] and body["available"] and body["num_classes"] == 10


def test_group_norm_model_lists_only_the_methods_that_adapt_it(client: TestClient) -> None:
    r = client.get("/v1/models/resnet20-gn")
    assert r.status_code == 200
    body = r.json()
    assert body["norms"] == ["gn"]
    assert set(body["methods"]) == set(method_names()) - BN_ONLY
    refused = {f["method"]: f["reason"] for f in body["method_fit"] if not f["fits"]}
    assert set(refused) == BN_ONLY
    assert "gn" in refused["bn"]
    # the card is the project's JSON model card, and names the same weights
    assert body["card"]["name"] == "resnet20-gn" and body["card"]["sha256"] == body["weights_sha256"]
    assert body["loaded"]  # loaded by this request
    assert "resnet20-gn" in {m["name"] for m in client.get("/v1/models").json()["models"] if m["loaded"]}


def test_unknown_model_is_a_404_in_the_error_shape(client: TestClient) -> None:
    r = client.get("/v1/models/no-such-model")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "not_found" and "no-such-model" in error["message"] and "resnet20" in error["message"]


def test_route_is_documented(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "404" in paths["/v1/models/{name}"]["get"]["responses"]


def test_bring_your_own_model_with_card_and_mode(tmp_path: Path, shared_dir: Path) -> None:
    save_file(cifar_resnet(20, "ln", num_classes=3).state_dict(), str(tmp_path / "ln.safetensors"))
    (tmp_path / "card.json").write_text(json.dumps({"data": "street cameras", "top1": 0.9}))
    entries = [
        {
            "name": "street-ln",
            "arch": "cifar_resnet20",
            "norm": "ln",
            "weights": "ln.safetensors",
            "classes": ["car", "person", "bike"],
            "input_size": 48,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "resize_mode": "letterbox",
            "card": "card.json",
        },
        {
            "name": "gone",
            "arch": "cifar_resnet20",
            "norm": "gn",
            "weights": "missing.safetensors",
            "classes": ["a", "b"],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
        },
    ]
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": entries}))
    settings = Settings(models_dir=shared_dir / "models", model_config_file=config, device="cpu", preload_models=[])
    with TestClient(create_app(settings)) as c:
        body = c.get("/v1/models/street-ln").json()
        assert body["card"] == {"data": "street cameras", "top1": 0.9}
        assert body["weights_sha256"] == file_sha256(tmp_path / "ln.safetensors")
        assert body["weights_sha256_pinned"] is None
        assert body["preprocessing"]["resize_mode"] == "letterbox"
        assert body["preprocessing"]["input_size"] == 48 and body["preprocessing"]["pad_colour"] == [128, 128, 128]
        assert body["norms"] == ["ln"] and "sar" in body["methods"] and "bn" not in body["methods"]

        missing = c.get("/v1/models/gone")
        assert missing.status_code == 200
        gone = missing.json()
        assert not gone["available"] and not gone["loaded"] and "not found" in gone["problem"]
        assert gone["norms"] == ["gn"] and "tent" in gone["methods"] and "bn" not in gone["methods"]
