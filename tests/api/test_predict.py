from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import NPY, encode, npy_bytes, random_images
from tta_server.api.schemas import PredictResponse
from tta_server.app import create_app
from tta_server.settings import Settings


@pytest.fixture
def stream(client: TestClient) -> str:
    assert client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "p"}).status_code == 201
    return "p"


def test_npy_predictions_have_labels_probabilities_topk_entropy(client: TestClient, stream: str) -> None:
    r = client.post(
        f"/v1/streams/{stream}/predict", content=npy_bytes(random_images(3)), headers=NPY, params={"top_k": 3}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["step"] == 1 and body["version"] == 1 and body["adapted"] and body["batch_images"] == 3
    assert len(body["predictions"]) == 3
    p = body["predictions"][0]
    assert len(p["top_k"]) == 3 and p["top_k"][0]["label"] == p["label"]
    assert p["class_name"] in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert p["top_k"][0]["probability"] >= p["top_k"][1]["probability"] >= p["top_k"][2]["probability"]
    assert 0 <= p["entropy"] <= np.log(10) + 1e-6


def test_the_answer_is_exactly_the_documented_schema(client: TestClient, stream: str) -> None:
    """The answer is built without pydantic models: it must be what the validated schema serializes to."""
    for body, headers in ((npy_bytes(random_images(2)), NPY), (None, None)):
        if body is None:  # multipart goes through the FastAPI route, .npy through the fast path
            files = [("files", ("a.png", encode(random_images(1)[0], "PNG"), "image/png"))]
            r = client.post(f"/v1/streams/{stream}/predict", files=files, params={"top_k": 2})
        else:
            r = client.post(f"/v1/streams/{stream}/predict", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.content == PredictResponse.model_validate_json(r.content).model_dump_json().encode()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_multipart_formats(client: TestClient, stream: str, fmt: str) -> None:
    files = [
        ("images", (f"{i}.img", encode(im, fmt), "application/octet-stream")) for i, im in enumerate(random_images(2))
    ]
    r = client.post(f"/v1/streams/{stream}/predict", files=files)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2


def test_json_base64_and_conversions(client: TestClient, stream: str) -> None:
    big_rgba = np.random.default_rng(1).integers(0, 256, (64, 48, 4), dtype=np.uint8)
    gray = np.random.default_rng(2).integers(0, 256, (32, 32), dtype=np.uint8)
    images = [base64.b64encode(encode(big_rgba)).decode(), base64.b64encode(encode(gray)).decode()]
    r = client.post(f"/v1/streams/{stream}/predict", json={"images": images, "top_k": 1})
    assert r.status_code == 200, r.text
    assert [len(p["top_k"]) for p in r.json()["predictions"]] == [1, 1]
    grayscale_batch = np.random.default_rng(3).integers(0, 256, (2, 40, 40), dtype=np.uint8)
    r = client.post(f"/v1/streams/{stream}/predict", content=npy_bytes(grayscale_batch), headers=NPY)
    assert r.status_code == 200, r.text


def test_adapt_false_predicts_without_updating(client: TestClient, stream: str) -> None:
    body = npy_bytes(random_images(4))
    client.post(f"/v1/streams/{stream}/predict", content=body, headers=NPY)
    before = client.get(f"/v1/streams/{stream}").json()
    r = client.post(f"/v1/streams/{stream}/predict", content=body, headers=NPY, params={"adapt": "false"})
    assert r.status_code == 200 and r.json()["adapted"] is False and r.json()["version"] == before["version"]
    after = client.get(f"/v1/streams/{stream}").json()
    assert (after["steps"], after["version"], after["samples_seen"]) == (
        before["steps"],
        before["version"],
        before["samples_seen"],
    )


def test_streams_are_isolated(client: TestClient) -> None:
    """Interleaving two streams gives exactly what each gives alone (predictions and states)."""
    a_images = [random_images(4, seed=s) for s in range(3)]
    b_images = [random_images(4, seed=10 + s) * 0 + 200 for s in range(3)]

    def run(ids: list[str], batches: dict[str, list[np.ndarray]]) -> dict[str, list[list[float]]]:
        out: dict[str, list[list[float]]] = {i: [] for i in batches}
        for step in range(3):
            for sid in ids:
                r = client.post(f"/v1/streams/{sid}/predict", content=npy_bytes(batches[sid][step]), headers=NPY)
                out[sid].append([p["probability"] for p in r.json()["predictions"]])
        return out

    for sid in ("a1", "b1", "a2", "b2"):
        client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": sid})
    together = run(["a1", "b1"], {"a1": a_images, "b1": b_images})
    alone_a = run(["a2"], {"a2": a_images})
    alone_b = run(["b2"], {"b2": b_images})
    assert together["a1"] == alone_a["a2"] and together["b1"] == alone_b["b2"]


def test_input_errors_are_clear_and_change_nothing(client: TestClient, stream: str) -> None:
    url = f"/v1/streams/{stream}/predict"
    cases = [
        (dict(content=b"GIF89a....", headers={"content-type": "image/gif"}), 415, "content type 'image/gif'"),
        (dict(files=[("images", ("x.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif"))]), 415, "image 0"),
        (dict(files=[("images", ("x.png", b"garbage", "image/png"))]), 415, "cannot be decoded"),
        (dict(json={"images": ["***"]}), 422, "not valid base64"),
        (dict(json={"images": []}), 422, "invalid JSON body"),
        (dict(content=npy_bytes(random_images(1).astype(np.float32)), headers=NPY), 422, "must be uint8"),
        (dict(content=npy_bytes(np.zeros((2, 3, 4, 5), np.uint8)), headers=NPY), 422, "N x H x W x 3"),
        (dict(content=npy_bytes(np.zeros((0, 32, 32, 3), np.uint8)), headers=NPY), 422, "no images"),
        (dict(content=b"\x93NUMPY broken", headers=NPY), 422, "not a valid .npy"),
    ]
    for kwargs, status, needle in cases:
        r = client.post(url, **kwargs)  # type: ignore[arg-type]
        assert r.status_code == status, (needle, r.text)
        assert needle in r.json()["error"]["message"], r.text
    r = client.post(url, content=npy_bytes(random_images(1)), headers=NPY, params={"top_k": 0})
    assert r.status_code == 422
    info = client.get(f"/v1/streams/{stream}").json()
    assert info["steps"] == 0 and info["version"] == 0
    assert (
        client.post("/v1/streams/absent/predict", content=npy_bytes(random_images(1)), headers=NPY).status_code == 404
    )


def test_limits_answer_413(settings: Settings) -> None:
    small = settings.model_copy(
        update={"max_body_bytes": 20_000, "max_images_per_request": 4, "max_pixels_per_image": 5000}
    )
    with TestClient(create_app(small)) as c:
        c.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "x"})
        r = c.post("/v1/streams/x/predict", content=npy_bytes(random_images(5)), headers=NPY)
        assert r.status_code == 413 and "5 images in one request exceeds the limit of 4" in r.json()["error"]["message"]
        r = c.post("/v1/streams/x/predict", content=b"\0" * 30_000, headers=NPY)
        assert r.status_code == 413 and "exceeds the limit of 20000" in r.json()["error"]["message"]
        bomb = encode(np.zeros((100, 100, 3), np.uint8))  # 10,000 pixels > 5,000
        r = c.post("/v1/streams/x/predict", files=[("images", ("b.png", bomb, "image/png"))])
        assert r.status_code == 413 and "pixels exceeds the limit" in r.json()["error"]["message"]
        assert c.get("/v1/streams/x").json()["version"] == 0
