"""Hostile and malformed input: refused from headers, with the documented codes, changing nothing."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.helpers import NPY, encode, npy_bytes, random_images
from tta_server.api.deps import Services
from tta_server.app import create_app
from tta_server.settings import Settings


@pytest.fixture
def hostile(settings: Settings) -> Iterator[TestClient]:
    small = settings.model_copy(update={"max_images_per_request": 8, "drift_sample_every": 0, "max_delay_ms": 0})
    with TestClient(create_app(small)) as c:
        assert c.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "s"}).status_code == 201
        yield c


def npy_with_header(shape: tuple[int, ...], descr: str = "|u1", data: bytes = b"") -> bytes:
    """A .npy body whose header declares ``shape`` whatever data follows."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (RGB), with a token of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def one_bit_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def unchanged(client: TestClient) -> bool:
    info = client.get("/v1/streams/s").json()
    return bool(info["steps"] == 0 and info["version"] == 0)


def test_npy_headers_are_checked_before_anything_is_allocated(hostile: TestClient) -> None:
    url = "/v1/streams/s/predict"
    cases = [
        (npy_with_header((10**6, 10**6, 10**6, 3)), 413),  # numpy would try to allocate the shape
        (npy_with_header((4, 10**9, 10**9, 3)), 413),
        (npy_with_header((1, 0, 0, 3)), 422),  # empty images
        (npy_with_header((2, 32, 0, 3)), 422),
        (npy_with_header((1, 32, 32, 3), data=b"\0" * 10), 422),  # data shorter than the header says
        (npy_with_header((1, 32, 32, 3), descr="<f4", data=b"\0" * 32 * 32 * 3 * 4), 422),
        (b"\x93NUMPY\x01\x00\xff\x00{'descr': ", 422),
        (npy_with_header((1, 32, 32, 3)).replace(b"(1, 32", b"(1  32", 1), 422),  # dimensions without a comma
        (npy_with_header((1, 10**13, 1, 3)), 413),  # a dimension of more than 12 digits
        (npy_with_header((8, 4096, 4096, 3)), 413),  # each image fits, the request's pixels do not
    ]
    for body, status in cases:
        started = time.perf_counter()
        r = hostile.post(url, content=body, headers=NPY)
        assert r.status_code == status, r.text
        assert time.perf_counter() - started < 1.0
    assert "empty" in hostile.post(url, content=npy_with_header((1, 0, 0, 3)), headers=NPY).json()["error"]["message"]
    too_many = hostile.post(url, content=npy_with_header((8, 4096, 4096, 3)), headers=NPY).json()["error"]
    assert "request's 8 images hold 134217728 pixels" in too_many["message"], too_many
    assert unchanged(hostile)


def test_decode_budget_refuses_bombs_from_their_headers(hostile: TestClient) -> None:
    """128 one-bit 4096 x 4096 PNGs cost seconds to decode: refused by the pixel budget instead."""
    url = "/v1/streams/s/predict"
    bomb = one_bit_png(4096)
    many = [("images", (f"{i}.png", bomb, "image/png")) for i in range(8)]
    r = hostile.post(url, files=many)
    assert r.status_code == 413 and "per request" in r.json()["error"]["message"], r.text
    huge = png_header_only(200_000, 200_000)  # over Pillow's own bomb guard
    r = hostile.post(url, files=[("images", ("h.png", huge, "image/png"))])
    assert r.status_code == 413, r.text
    r = hostile.post(url, files=[("images", (f"{i}.png", encode(random_images(1)[0]), "image/png")) for i in range(9)])
    assert r.status_code == 413 and "more than 8 files" in r.json()["error"]["message"], r.text
    assert unchanged(hostile)


def test_malformed_bodies_answer_documented_codes_without_heap_addresses(hostile: TestClient) -> None:
    r = hostile.post("/v1/streams/s/predict", files=[("images", ("x.png", b"garbage", "image/png"))])
    assert r.status_code == 415 and " at 0x" not in r.text, r.text
    bad_boundary = {"content-type": "multipart/form-data; boundary=nope"}
    r = hostile.post("/v1/streams/s/predict", content=b"--other\r\n\r\n--other--\r\n", headers=bad_boundary)
    assert r.status_code in (413, 415, 422) and r.status_code != 400, r.text
    r = hostile.post("/v1/streams", content=b'{"model": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text
    r = hostile.post(
        "/v1/streams/s/predict", content=b'{"images": ["\xff"]}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    r = hostile.put("/v1/streams/s/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers
    assert unchanged(hostile)


def multipart_body(files: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body of PNG files, built once (so the sender spends no CPU per request)."""
    boundary = "tta-bomb-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + blob
        + b"\r\n"
        for i, blob in enumerate(files)
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_bombs_are_refused_fast_while_another_stream_keeps_its_latency(hostile: TestClient) -> None:
    """Refusals cost header reads only: a neighbour's median latency stays within 2x while bombs arrive.

    The attacker sends 8 one-bit 4096 x 4096 PNGs (1.1 s of decoding before admission existed)
    every 100 ms, ten times what decoding them could keep up with; the budget refuses them from
    their headers.
    """
    assert (
        hostile.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "calm"}).status_code == 201
    )
    calm = npy_bytes(random_images(4))
    bomb_body, bomb_headers = multipart_body([one_bit_png(4096)] * 8)

    def calm_latency() -> float:
        started = time.perf_counter()
        assert hostile.post("/v1/streams/calm/predict", content=calm, headers=NPY).status_code == 200
        return time.perf_counter() - started

    for _ in range(3):  # warm-up
        calm_latency()
    refusals: list[float] = []

    def attack(stop: threading.Event) -> None:
        while not stop.is_set() and len(refusals) < 500:
            started = time.perf_counter()
            r = hostile.post("/v1/streams/s/predict", content=bomb_body, headers=bomb_headers)
            assert r.status_code == 413, r.text
            refusals.append(time.perf_counter() - started)
            stop.wait(0.1)

    alone: list[float] = []
    attacked: list[float] = []
    for _ in range(3):  # phases interleaved, so a change of the machine's load hits both alike
        alone += [calm_latency() for _ in range(8)]
        stop = threading.Event()
        attacker = threading.Thread(target=attack, args=(stop,))
        attacker.start()
        try:
            attacked += [calm_latency() for _ in range(8)]
        finally:
            stop.set()
            attacker.join(timeout=60)
    assert len(refusals) >= 3
    assert float(np.median(refusals)) < 0.05, refusals
    assert float(np.median(attacked)) < 2 * float(np.median(alone)), (alone, attacked)
    assert unchanged(hostile)


def test_server_faults_are_counted_like_any_answer(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(settings)
    services: Services = app.state.services

    async def broken(*_: object) -> None:
        raise RuntimeError("boom at 0x7f00deadbeef")

    monkeypatch.setattr(services.streams, "get", broken)
    with TestClient(app) as c:
        r = c.get("/v1/streams/anything")
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError"
        text = c.get("/metrics").text
    assert 'route="/v1/streams/{stream_id}",status="500"} 1.0' in text
