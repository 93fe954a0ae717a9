from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.app import create_app
from tta_server.settings import Settings

KEYS = {"acme-key-0123456789": "acme", "bolt-key-0123456789": "bolt", "admin-key-0123456789": "*"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def secured(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"api_keys": KEYS}))) as c:
        yield c


def test_missing_or_wrong_key_is_401(secured: TestClient) -> None:
    r = secured.get("/v1/streams")
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    assert (
        secured.get("/v1/streams", headers=auth("wrong-key-0123456789")).json()["error"]["message"] == "unknown API key"
    )
    assert secured.get("/v1/streams", headers={"Authorization": "Basic abc"}).status_code == 401
    assert secured.get("/healthz").status_code == 200  # probes stay open


def test_tenants_never_see_each_others_streams(secured: TestClient) -> None:
    body = {"model": "resnet20", "method": "bn", "stream_id": "cam"}
    assert secured.post("/v1/streams", json=body, headers=auth("acme-key-0123456789")).status_code == 201
    # the same id is free in another tenant
    assert secured.post("/v1/streams", json=body, headers=auth("bolt-key-0123456789")).status_code == 201
    secured.post("/v1/streams", json={**body, "stream_id": "acme-only"}, headers=auth("acme-key-0123456789"))
    bolt = auth("bolt-key-0123456789")
    for method, path in [
        ("get", "/v1/streams/acme-only"),
        ("delete", "/v1/streams/acme-only"),
        ("post", "/v1/streams/acme-only/reset"),
        ("get", "/v1/streams/acme-only/state"),
        ("get", "/v1/streams/acme-only/drift"),
    ]:
        assert secured.request(method, path, headers=bolt).status_code == 404, path
    r = secured.post("/v1/streams/acme-only/predict", content=npy_bytes(random_images(1)), headers={**bolt, **NPY})
    assert r.status_code == 404
    # x-tenant is ignored for non-admin keys
    assert secured.get("/v1/streams/acme-only", headers={**bolt, "X-Tenant": "acme"}).status_code == 404
    assert [s["stream_id"] for s in secured.get("/v1/streams", headers=bolt).json()["streams"]] == ["cam"]


def test_admin_sees_all_and_acts_inside_a_tenant(secured: TestClient) -> None:
    secured.post(
        "/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "a"}, headers=auth("acme-key-0123456789")
    )
    secured.post(
        "/v1/streams", json={"model": "resnet20", "method": "bn", "stream_id": "b"}, headers=auth("bolt-key-0123456789")
    )
    admin = auth("admin-key-0123456789")
    everything = secured.get("/v1/streams", params={"all_tenants": True}, headers=admin).json()
    assert {(s["tenant"], s["stream_id"]) for s in everything["streams"]} == {("acme", "a"), ("bolt", "b")}
    assert secured.get("/v1/streams/a", headers={**admin, "X-Tenant": "acme"}).json()["tenant"] == "acme"
    # all_tenants is ignored for tenants
    assert (
        secured.get("/v1/streams", params={"all_tenants": True}, headers=auth("acme-key-0123456789")).json()["total"]
        == 1
    )


def test_short_keys_are_refused_by_settings() -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(api_keys={"short": "acme"})
