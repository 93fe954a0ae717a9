"""The Open Inference Protocol (KServe V2) routes, driven by the real ``tritonclient[http]`` client.

tritonclient needs a live HTTP server, so one uvicorn server runs in a thread for the module;
error cases that the client cannot even send (a lying shape, a broken header) use httpx.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import uvicorn
from fastapi.testclient import TestClient
from safetensors.numpy import load as load_tensors
from tritonclient.utils import InferenceServerException

from tests.api.helpers import NPY, npy_bytes, random_images
from tests.conftest import SHARED
from tests.support.processes import free_port
from tta_server.app import create_app
from tta_server.settings import Settings


@dataclass
class Live:
    """A server in this process: its base URL, a tritonclient and an httpx client."""

    url: str
    triton: triton.InferenceServerClient
    http: httpx.Client

    def create(self, stream_id: str, method: str = "unmix_tns", seed: int = 3, model: str = "resnet20") -> None:
        r = self.http.post("/v1/streams", json={"model": model, "method": method, "stream_id": stream_id, "seed": seed})
        assert r.status_code == 201, r.text

    def state(self, stream_id: str) -> dict[str, np.ndarray]:
        r = self.http.get(f"/v1/streams/{stream_id}/state")
        assert r.status_code == 200, r.text
        return load_tensors(r.content)

    def steps(self, stream_id: str) -> int:
        return int(self.http.get(f"/v1/streams/{stream_id}").json()["steps"])


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    if not (SHARED / "models" / "resnet-cifar10").is_dir():
        pytest.fail(f"shared data not found at {SHARED}")
    settings = Settings(models_dir=SHARED / "models", data_dir=SHARED / "data", device="cpu", max_images_per_request=64)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    url = f"127.0.0.1:{port}"
    client = triton.InferenceServerClient(url=url, network_timeout=60.0)
    with httpx.Client(base_url=f"http://{url}", timeout=60.0) as http:
        yield Live(url, client, http)
    client.close()
    server.should_exit = True
    thread.join(timeout=30)


def uint8_input(images: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def v1_probabilities(live: Live, stream_id: str, images: np.ndarray) -> np.ndarray:
    r = live.http.post(f"/v1/streams/{stream_id}/predict?top_k=10", content=npy_bytes(images), headers=NPY)
    assert r.status_code == 200, r.text
    out = np.zeros((len(images), 10), dtype=np.float32)
    for i, prediction in enumerate(r.json()["predictions"]):
        for top in prediction["top_k"]:
            out[i, top["label"]] = top["probability"]
    return out


def test_server_and_model_metadata_and_readiness(live: Live) -> None:
    assert live.triton.is_server_live() and live.triton.is_server_ready()
    server = live.triton.get_server_metadata()
    assert server["name"] == "tta-server" and "binary_tensor_data" in server["extensions"]
    meta = live.triton.get_model_metadata("resnet20")
    assert meta["name"] == "resnet20" and meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert {(o["name"], o["datatype"], tuple(o["shape"])) for o in meta["outputs"]} == {
        ("probabilities", "FP32", (-1, 10)),
        ("labels", "INT64", (-1,)),
        ("class_names", "BYTES", (-1,)),
    }
    assert meta["versions"] == [meta["parameters"]["weights_sha256"][:12]]
    assert "unmix_tns" in meta["parameters"]["methods"].split(",")
    assert live.triton.is_model_ready("resnet20")
    assert not live.triton.is_model_ready("resnet32")  # in the catalogue, not loaded: 4xx
    with pytest.raises(InferenceServerException) as info:
        live.triton.get_model_metadata("no-such-model")
    assert info.value.status() == "404" and "unknown model" in info.value.message()


def test_a_stream_adapted_through_v2_ends_in_the_state_of_the_same_batches_through_v1(live: Live) -> None:
    """Three batches: binary UINT8 NHWC with stream_id, JSON FP32 NCHW (k/255), binary UINT8 via sequence_id."""
    live.create("v2-adapted")
    live.create("v1-adapted")
    batches = [random_images(8, seed=s) for s in (11, 12, 13)]

    first = live.triton.infer("resnet20", [uint8_input(batches[0])], parameters={"stream_id": "v2-adapted"})
    fp32 = (batches[1].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)).astype(np.float32)
    tensor = triton.InferInput("images", list(fp32.shape), "FP32")
    tensor.set_data_from_numpy(fp32, binary_data=False)
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("probabilities", "labels")]
    second = live.triton.infer("resnet20", [tensor], outputs=outputs, parameters={"stream_id": "v2-adapted"})
    third = live.triton.infer("resnet20", [uint8_input(batches[2])], sequence_id="v2-adapted")

    for result, images in zip((first, second, third), batches, strict=True):
        expected = v1_probabilities(live, "v1-adapted", images)
        probs = result.as_numpy("probabilities")
        assert probs.shape == (8, 10) and probs.dtype == np.float32
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("labels"), expected.argmax(1))
    assert third.get_response()["parameters"]["step"] == 3
    names = first.as_numpy("class_names")
    assert names is not None and names.shape == (8,) and all(isinstance(n, bytes) for n in names)

    via_v2, via_v1 = live.state("v2-adapted"), live.state("v1-adapted")
    assert set(via_v2) == set(via_v1) and via_v2
    for name, tensor_v2 in via_v2.items():
        np.testing.assert_array_equal(tensor_v2, via_v1[name], err_msg=name)
    assert live.steps("v2-adapted") == live.steps("v1-adapted") == 3


def test_dry_run_classification_and_integer_sequence_ids(live: Live) -> None:
    live.create("42", method="bn")
    images = random_images(4, seed=5)
    outputs = [
        triton.InferRequestedOutput("probabilities", class_count=3),
        triton.InferRequestedOutput("class_names", binary_data=False),
    ]
    result = live.triton.infer(
        "resnet20", [uint8_input(images)], outputs=outputs, sequence_id=42, parameters={"adapt": False}
    )
    response = result.get_response()
    assert response["parameters"]["adapted"] is False and response["parameters"]["stream_id"] == "42"
    assert live.steps("42") == 0
    top = result.as_numpy("probabilities")
    assert top is not None and top.shape == (4, 3)
    value, index, label = top[0, 0].decode().split(":")
    assert 0 <= float(value) <= 1 and 0 <= int(index) < 10
    assert result.as_numpy("class_names")[0] in (label, label.encode())  # JSON BYTES come back as str


def test_errors_in_the_protocols_shape(live: Live) -> None:
    live.create("err-stream", method="bn")
    images = random_images(2)

    def status_of(model: str, **kwargs: object) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as info:
            live.triton.infer(model, [uint8_input(images)], **kwargs)
        return str(info.value.status()), str(info.value.message())

    assert status_of("resnet20")[0] == "400"  # no stream named
    assert status_of("resnet20", parameters={"stream_id": "nope"})[0] == "404"
    assert status_of("no-such-model", parameters={"stream_id": "err-stream"})[0] == "404"
    status, message = status_of("resnet56", parameters={"stream_id": "err-stream"})
    assert status == "400" and "runs model 'resnet20'" in message
    status, message = status_of("resnet20", parameters={"stream_id": "err-stream", "adapt": "yes"})
    assert status == "400" and "adapt" in message

    def post(body: dict[str, object], binary: bytes = b"", **headers: str) -> httpx.Response:
        header = json.dumps(body).encode()
        if binary:
            headers["Inference-Header-Content-Length"] = str(len(header))
        return live.http.post("/v2/models/resnet20/infer", content=header + binary, headers=headers)

    def one(shape: list[int], datatype: str = "UINT8", **tensor: object) -> dict[str, object]:
        return {
            "parameters": {"stream_id": "err-stream"},
            "inputs": [{"name": "images", "shape": shape, "datatype": datatype, **tensor}],
        }

    # admitted from the declared shape, before any tensor is built: 65 images over the limit of 64
    r = post(one([65, 32, 32, 3], parameters={"binary_data_size": 3}), b"\0\0\0")
    assert r.status_code == 413 and set(r.json()) == {"error", "request_id"}
    assert r.json()["request_id"] == r.headers["x-request-id"]
    r = post(one([1, 100_000, 100_000, 3], parameters={"binary_data_size": 3}), b"\0\0\0")
    assert r.status_code == 413
    r = post(one([2, 4096, 4096, 3], parameters={"binary_data_size": 3}), b"\0\0\0")  # each image fits, both don't
    assert r.status_code == 413 and "per request" in r.json()["error"]
    r = post(one([1, 2, 2, 3], parameters={"binary_data_size": 3}), b"\0\0\0")
    assert r.status_code == 400 and "binary data of 3 bytes" in r.json()["error"]
    r = post(one([1, 3, 4, 3], data=[0] * 36))
    assert r.status_code == 400 and "parameters.layout" in r.json()["error"]  # NHWC or NCHW? ambiguous
    r = post(one([1, 3, 4, 3], data=[0] * 36, parameters={"layout": "NCHW"}))
    assert r.status_code == 200, r.text  # said which: fitted to 32x32
    assert post(one([1, 1, 1, 3], "INT32", data=[0, 0, 0])).status_code == 400
    r = post(one([1, 1, 1, 3], data=[0, 256, 0]))
    assert r.status_code == 400 and "0..255" in r.json()["error"]
    r = post(one([1, 1, 1, 3], "FP32", data=[-0.4, 0.1, 2.1]))
    assert r.status_code == 400 and "normalized" in r.json()["error"]
    assert post(one([1, 1, 1, 3], data=[0, 0])).status_code == 400
    r = live.http.post("/v2/models/resnet20/infer", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"].startswith("invalid inference request")
    r = live.http.get("/v2/nothing")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    assert live.steps("err-stream") == 1  # only the accepted request adapted it

    body = json.dumps(one([1, 1, 1, 3], data=[1, 2, 3])).encode()
    r = live.http.post("/v2/models/resnet20/infer", content=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][1]["name"] == "labels"
    bomb = gzip.compress(b" " * (20 * 1024 * 1024))
    r = live.http.post("/v2/models/resnet20/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413


def test_auth_and_tenants_as_on_v1() -> None:
    key_a, key_b = "a" * 16, "b" * 16
    settings = Settings(
        models_dir=SHARED / "models", data_dir=SHARED / "data", device="cpu", api_keys={key_a: "acme", key_b: "other"}
    )
    body = {
        "parameters": {"stream_id": "cam"},
        "inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [7] * 3072}],
    }
    with TestClient(create_app(settings)) as client:
        a, b = {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}
        r = client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "cam"}, headers=a)
        assert r.status_code == 201
        r = client.post("/v2/models/resnet20/infer", json=body)
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
        assert client.post("/v2/models/resnet20/infer", json=body, headers=b).status_code == 404
        r = client.post("/v2/models/resnet20/infer", json=body, headers=a)
        assert r.status_code == 200 and r.json()["parameters"]["step"] == 1
        assert client.get("/v2/health/ready").status_code == 200


def test_fp32_in_0_1_equals_uint8(live: Live) -> None:
    """FP32 k/255 is rounded back to k: the same predictions, bit for bit."""
    live.create("dry", method="bn")
    images = random_images(3, seed=9)
    as_float = images.astype(np.float32) / np.float32(255.0)
    tensor = triton.InferInput("images", list(as_float.shape), "FP32")
    tensor.set_data_from_numpy(as_float)
    params = {"stream_id": "dry", "adapt": False}
    from_float = live.triton.infer("resnet20", [tensor], parameters=params).as_numpy("probabilities")
    from_uint8 = live.triton.infer("resnet20", [uint8_input(images)], parameters=params).as_numpy("probabilities")
    np.testing.assert_array_equal(from_float, from_uint8)
