"""Schemathesis over every operation of /openapi.json, against the real app in process.

Each generated request must answer something the OpenAPI document declares (status code,
content type, headers, body schema) and never a 5xx. Half of the generated stream ids are
replaced by one pre-registered, already adapted stream, so most of what the fuzzer sends to
stream routes (bodies that cannot be decoded, states that do not fit, bad queries) lands on a
real stream; after every rejected (4xx) request that stream's version, step and sample count
must be what they were. The budget is bounded and the generation seeded and derandomized, so a
CI run is reproducible and takes a couple of minutes at most on a busy 2-core machine.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.python import asgi

from tests.api.helpers import NPY, npy_bytes, random_images
from tests.conftest import SHARED
from tta_server.app import create_app
from tta_server.settings import Settings

ANCHOR = "fuzz-anchor"
MAX_EXAMPLES = 30  # per operation and generation phase; about 2 minutes for all operations on a busy 2-core machine

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20261205,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "mode": "all", "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {
            # ignored_auth and the like assume keys are required; this app runs with auth off
            "enabled": False,
            "not_a_server_error": {"enabled": True},
            "status_code_conformance": {"enabled": True},
            "content_type_conformance": {"enabled": True},
            "response_headers_conformance": {"enabled": True},
            "response_schema_conformance": {"enabled": True},
        },
    }
)


@dataclass
class Anchor:
    """The pre-registered stream and what a rejected request must leave of it."""

    client: asgi.ASGIClient
    expected: dict[str, Any] = field(default_factory=dict)

    def observe(self) -> dict[str, Any] | None:
        """The anchor's version, step and samples seen, or None when it does not exist."""
        r = self.client.get(f"/v1/streams/{ANCHOR}")
        if r.status_code == 404:
            return None
        assert r.status_code == 200, r.text
        body = r.json()
        return {k: body[k] for k in ("version", "steps", "samples_seen", "model", "method")}

    def ensure(self) -> None:
        """Register the anchor (bn, one adapting step) if a delete removed it, and remember its state."""
        if self.observe() is None:
            r = self.client.post("/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": ANCHOR})
            assert r.status_code == 201, r.text
            r = self.client.post(f"/v1/streams/{ANCHOR}/predict", data=npy_bytes(random_images(2)), headers=NPY)
            assert r.status_code == 200, r.text
        observed = self.observe()
        assert observed is not None
        self.expected = observed


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document the app built from ``settings`` serves (no lifespan, nothing loaded)."""
    return create_app(settings.model_copy(update={"preload_models": []})).openapi()


# Collected at import, so one pytest item per operation; the fixture below checks that the app
# under test serves exactly this document.
schema = schemathesis.openapi.from_dict(
    openapi_document(Settings(models_dir=SHARED / "models", data_dir=SHARED / "data", device="cpu")), config=CONFIG
)


@schema.hook("flatmap_path_parameters")
def _aim_at_anchor(_: schemathesis.HookContext, path_parameters: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Two in three generated stream ids are the anchor's, so rejected requests hit a real stream;
    half the model names are ``resnet20``, so model routes get past the 404."""
    if path_parameters and "name" in path_parameters:  # a catalogue model (loaded), or what was generated
        return st.sampled_from([path_parameters, {**path_parameters, "name": "resnet20"}])
    if not path_parameters or "stream_id" not in path_parameters:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, "stream_id": ANCHOR}, {"stream_id": ANCHOR}])


# .npy bodies are bytes like any octet stream
schemathesis.serializer.alias("application/x-npy", "application/octet-stream")


def npy_headers() -> st.SearchStrategy[bytes]:
    """Syntactically valid .npy files of odd dtypes and shapes (empty, huge, too few or many axes),
    some cut short: what a careless client sends, beyond what random bytes reach."""
    dtype = st.sampled_from(["|u1", "<f4", "<i2", "|b1", ">u2", "<U3", "|O"])
    shape = st.lists(st.integers(0, 2**40).map(lambda n: n if n < 64 else n % 5000), max_size=5).map(tuple)
    order = st.sampled_from(["False", "True"])

    def build(d: str, dims: tuple[int, ...], fortran: str, keep: float) -> bytes:
        header = f"{{'descr': '{d}', 'fortran_order': {fortran}, 'shape': {dims!r}, }}".encode()
        header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
        data = bytes(min(4096, int(np.prod(dims, dtype=np.float64)) if dims else 1))
        blob = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data
        return blob[: max(1, int(len(blob) * keep))]

    return st.builds(build, dtype, shape, order, st.sampled_from([1.0, 1.0, 0.5, 0.9]))


def encoded_images() -> st.SearchStrategy[bytes]:
    """Real PNG, JPEG and WebP files of odd sizes and modes (1 x 1, long and thin, grey, RGBA, palette)."""

    def build(width: int, height: int, mode: str, fmt: str) -> bytes:
        if fmt == "JPEG" and mode in ("RGBA", "P"):
            mode = "RGB"
        buf = io.BytesIO()
        Image.new(mode, (width, height), 7).save(buf, format=fmt)
        return buf.getvalue()

    side = st.integers(1, 300)
    return st.builds(build, side, side, st.sampled_from(["RGB", "L", "RGBA", "P", "1"]), st.sampled_from(FORMATS))


FORMATS = ["PNG", "JPEG", "WEBP"]


@schema.hook("flatmap_body")
def _predict_bodies(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """Predict bodies: what was generated, or crafted .npy files and real images that get past the first checks."""
    if context.operation is None or not context.operation.path.endswith("/predict"):
        return st.just(body)
    if not isinstance(body, dict):
        return st.one_of(st.just(body), npy_headers())
    generated = body.get("images")
    if not isinstance(generated, list) or not generated:
        return st.just(body)
    images = st.lists(encoded_images(), min_size=1, max_size=4)
    if all(isinstance(v, str) for v in generated):  # JSON: base64 strings
        crafted = images.map(lambda blobs: {**body, "images": [base64.b64encode(b).decode() for b in blobs]})
    elif all(isinstance(v, bytes) or hasattr(v, "data") for v in generated):  # multipart: files
        crafted = images.map(lambda blobs: {**body, "images": blobs})
    else:  # a negative case of the JSON schema: leave it as generated
        return st.just(body)
    return st.one_of(st.just(body), crafted)


@schema.hook("flatmap_headers")
def _own_tenant(_: schemathesis.HookContext, headers: dict[str, Any] | None) -> st.SearchStrategy[Any]:
    """Without auth ``X-Tenant`` picks the tenant: drop it two times in three so the anchor is found."""
    if not headers or "X-Tenant" not in headers:
        return st.just(headers)
    own = {k: v for k, v in headers.items() if k != "X-Tenant"}
    return st.sampled_from([headers, own, own])


@pytest.fixture
def anchor(settings: Settings) -> Iterator[Anchor]:
    """The app built from the tests' settings (its lifespan run by schemathesis' ASGI client) and its anchor."""
    assert openapi_document(settings) == schema.raw_schema
    app = create_app(settings.model_copy(update={"max_queue": 64}))
    client = asgi.get_client(cast(Any, app))  # FastAPI's scope types are wider than schemathesis' alias
    try:
        with client:
            registered = Anchor(client)
            registered.ensure()
            yield registered
    finally:
        asgi.shutdown_lifespans()  # stops this app's batcher and store threads


@pytest.mark.slow
@schema.parametrize()
# The anchor is meant to persist across inputs; generation speed depends on the machine's load.
@settings(suppress_health_check=list(HealthCheck))
def test_fuzz(case: schemathesis.Case[Any], anchor: Anchor) -> None:
    """No 5xx, nothing off the schema, and a rejected request leaves the anchor stream as it was."""
    response = case.call(session=anchor.client, base_url=f"http://{asgi.HOST}")
    case.validate_response(response)
    if 400 <= response.status_code < 500:
        assert anchor.observe() == anchor.expected, (
            f"{case.method} {case.formatted_path} answered {response.status_code} but changed the stream"
        )
    else:
        anchor.ensure()
