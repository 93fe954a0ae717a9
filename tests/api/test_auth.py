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


def test_every_401_names_the_bearer_scheme(secured: TestClient) -> None:
    for headers in ({}, auth("wrong-key-0123456789"), {"Authorization": "Basic abc"}):
        r = secured.get("/v1/streams", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert r.json()["error"]["code"] == "unauthorized"
    r = secured.post("/v1/streams/x/predict", content=npy_bytes(random_images(1)), headers=NPY)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("tenant", ["*", "a/b", "", " acme", "-acme", "x" * 129, "acme!"])
def test_x_tenant_is_checked_like_a_stream_id(secured: TestClient, tenant: str) -> None:
    r = secured.get("/v1/streams", headers={**auth("admin-key-0123456789"), "X-Tenant": tenant})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert "X-Tenant" in error["message"] and error["detail"][0]["loc"] == ["header", "x-tenant"]


def test_x_tenant_is_checked_without_keys_too(client: TestClient) -> None:
    assert client.get("/v1/streams", headers={"X-Tenant": "*"}).status_code == 422
    assert client.get("/v1/streams", headers={"X-Tenant": "acme.eu-1"}).status_code == 200


def test_a_missing_key_is_401_before_a_bad_x_tenant_is_422(secured: TestClient) -> None:
    assert secured.get("/v1/streams", headers={"X-Tenant": "*"}).status_code == 401


PUBLIC_BY_DEFAULT = ["/v1/models", "/v1/models/resnet20", "/v1/methods", "/docs", "/redoc", "/openapi.json"]
ALWAYS_PUBLIC = ["/healthz", "/readyz", "/metrics"]


def test_catalogue_docs_and_probes_answer_without_a_key_by_default(secured: TestClient) -> None:
    for path in PUBLIC_BY_DEFAULT + ALWAYS_PUBLIC:
        assert secured.get(path).status_code == 200, path


def test_a_setting_puts_the_catalogue_and_docs_behind_a_key(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": KEYS, "require_key_for_catalog_and_docs": True})
    with TestClient(create_app(keyed)) as c:
        for path in PUBLIC_BY_DEFAULT:
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            assert c.get(path, headers=auth("bolt-key-0123456789")).status_code == 200, path
        assert c.get("/docs/oauth2-redirect").status_code in (401, 404)
        for path in ALWAYS_PUBLIC:
            assert c.get(path).status_code == 200, path
        assert (
            "HTTPBearer"
            in c.get("/openapi.json", headers=auth("acme-key-0123456789")).json()["components"]["securitySchemes"]
        )


def test_the_setting_changes_nothing_without_keys(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"require_key_for_catalog_and_docs": True}))) as c:
        for path in PUBLIC_BY_DEFAULT:
            assert c.get(path).status_code == 200, path


def test_openapi_declares_the_bearer_scheme_on_stream_routes(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["HTTPBearer"]["description"],
    }
    for path, ops in doc["paths"].items():
        for verb, op in ops.items():
            if path.startswith("/v1/streams"):
                assert op.get("security") == [{"HTTPBearer": []}], (verb, path)
                assert "authorization" not in {p["name"].lower() for p in op.get("parameters", [])}
                x_tenant = [p for p in op.get("parameters", []) if p["name"].lower() == "x-tenant"]
                assert x_tenant and "pattern" in x_tenant[0]["schema"], (verb, path)
