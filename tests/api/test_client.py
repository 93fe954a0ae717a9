"""The sync client against the real app (FastAPI's TestClient is an ``httpx.Client``).

Retry and error-mapping cases that the app cannot be made to produce on demand (a proxy's
HTML 502, a refused connection) use ``httpx.MockTransport``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

import tta_client
from tests.api.helpers import encode, random_images
from tta_client import (
    ClientTimeout,
    Conflict,
    ConnectFailed,
    DeadlineExceeded,
    ImageInputError,
    Invalid,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    RetryPolicy,
    ServerError,
    StoreUnavailable,
    TTAClient,
    TTAClientError,
    Unauthorized,
    UnsupportedMedia,
)
from tta_client import types as client_types
from tta_client.errors import BY_CODE, parse_retry_after
from tta_client.images import EncodedImage
from tta_server import errors as server_errors
from tta_server.api import schemas
from tta_server.app import create_app
from tta_server.settings import Settings

ADMIN_KEY = "admin-key-0123456789"
ACME_KEY = "acme-key-0123456789ab"


@pytest.fixture
def api(client: TestClient) -> TTAClient:
    return TTAClient(http=client, retry=RetryPolicy.never())


def app_client(settings: Settings, **update: object) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update=update))) as c:
        yield c


def test_health_readiness_catalogue_and_metrics(api: TTAClient) -> None:
    assert api.health()
    report = api.ready()
    assert report.ready and "resnet20" in report.models_loaded and report.store_ok
    models = {m.name: m for m in api.models()}
    assert models["resnet20"].num_classes == 10 and models["resnet20"].loaded
    methods = {m.name: m for m in api.methods()}
    assert {"source", "bn", "tent"} <= set(methods) and "properties" in methods["tent"].config_schema
    assert "tta_http_requests_total" in api.metrics()
    assert api.wait_ready(timeout=1).ready


def test_stream_lifecycle_and_paging(api: TTAClient) -> None:
    made = api.create_stream("resnet20", "bn", stream_id="cam-1", metadata={"site": "north"}, seed=3)
    assert made.stream_id == "cam-1" and made.steps == 0 and made.seed == 3 and made.metadata == {"site": "north"}
    generated = api.create_stream("resnet20", "alpha_bn", {"source_weight": 0.8})
    assert len(generated.stream_id) == 16 and generated.config["source_weight"] == 0.8
    api.create_stream("resnet20", "source", stream_id="cam-3")
    page = api.list_streams(limit=2)
    assert page.total == 3 and [s.stream_id for s in page.streams] == ["cam-1", generated.stream_id]
    assert [s.stream_id for s in api.iter_streams(page_size=1)] == ["cam-1", generated.stream_id, "cam-3"]
    assert api.get_stream("cam-1").drift is not None
    api.delete_stream("cam-1")
    with pytest.raises(NotFound) as info:
        api.get_stream("cam-1")
    assert info.value.status == 404 and info.value.code == "not_found" and "cam-1" in info.value.message
    with pytest.raises(NotFound):
        api.delete_stream("cam-1")


def test_predict_accepts_arrays_paths_and_encoded_bytes(api: TTAClient, tmp_path: Path) -> None:
    api.create_stream("resnet20", "bn", stream_id="p")
    batch = random_images(6)
    result = api.predict("p", batch, top_k=3)
    assert len(result.predictions) == 6 and result.step == 1 and result.adapted and result.batch_images == 6
    assert all(len(p.top_k) == 3 and 0 <= p.probability <= 1 and p.entropy >= 0 for p in result.predictions)
    assert result.labels == [p.label for p in result.predictions]
    assert len(api.predict("p", batch[0]).predictions) == 1  # one H x W x 3 image
    assert len(api.predict("p", list(batch[:2])).predictions) == 2  # a list of arrays
    path = tmp_path / "cat.png"
    path.write_bytes(encode(batch[0]))
    jpeg = encode(batch[1], "JPEG")
    mixed: list[EncodedImage] = [path, str(path), jpeg]
    assert len(api.predict("p", mixed).predictions) == 3
    assert len(api.predict("p", jpeg, encoding="json").predictions) == 1
    frozen = api.predict("p", batch, adapt=False)
    assert not frozen.adapted and frozen.step == api.get_stream("p").steps == 5


def test_predict_input_errors_are_caught_before_sending(api: TTAClient, tmp_path: Path) -> None:
    cases: list[object] = [
        random_images(2).astype(np.float32),
        [],
        [random_images(1)[0], b"\x89PNG"],
        [random_images(1, size=32)[0], random_images(1, size=16)[0]],
        tmp_path / "missing.png",
        42,
    ]
    for images in cases:
        with pytest.raises(ImageInputError):
            api.predict("p", images)  # type: ignore[arg-type]


def test_state_backup_restore_reset_and_drift(api: TTAClient) -> None:
    api.create_stream("resnet20", "bn", stream_id="a")
    api.create_stream("resnet20", "bn", stream_id="b")
    api.create_stream("resnet20", "source", stream_id="other")
    api.predict("a", random_images(8))
    api.predict("a", random_images(8, seed=1))
    backup = api.export_state("a")
    assert backup.data[:8] and backup.version >= 1 and backup.stream_id == "a"
    restored = api.import_state("b", backup)
    assert restored.step == 2 and api.get_stream("b").steps == 2
    with pytest.raises(Invalid) as info:
        api.import_state("other", backup.data)
    assert info.value.status == 422 and "method" in info.value.message
    drift = api.drift("a")
    assert drift.lifetime_images == 16 and drift.short.images == 16 and drift.short.entropy_mean is not None
    reset = api.reset_stream("a")
    assert reset.step == 2 and reset.version > backup.version  # counters survive a reset


def test_api_errors_map_to_exceptions(api: TTAClient) -> None:
    api.create_stream("resnet20", "bn", stream_id="dup")
    with pytest.raises(Conflict) as conflict:
        api.create_stream("resnet20", "bn", stream_id="dup")
    assert conflict.value.status == 409
    with pytest.raises(Invalid) as invalid:
        api.create_stream("nope", "bn")
    assert invalid.value.code == "validation_error" and "nope" in invalid.value.message
    with pytest.raises(Invalid):
        api.create_stream("resnet20", "bn", stream_id="bad id!")
    with pytest.raises(UnsupportedMedia) as media:
        api.predict("dup", b"definitely not an image")
    assert media.value.status == 415 and media.value.detail == {"index": 0}
    with pytest.raises(NotFound):
        api.predict("ghost", random_images(1))
    with pytest.raises(TTAClientError):  # every error is one of ours
        api.get_stream("../v1/models")


def test_payload_limits_raise_payload_too_large(settings: Settings) -> None:
    for c in app_client(settings, max_images_per_request=2):
        api = TTAClient(http=c)
        api.create_stream("resnet20", "bn", stream_id="s")
        with pytest.raises(PayloadTooLarge) as info:
            api.predict("s", random_images(3))
        assert info.value.status == 413 and info.value.detail == {"images": 3, "max_images": 2}


def test_api_keys_and_tenants(settings: Settings) -> None:
    for c in app_client(settings, api_keys={ADMIN_KEY: "*", ACME_KEY: "acme"}):
        with pytest.raises(Unauthorized) as info:
            TTAClient(http=c).list_streams()
        assert info.value.status == 401 and "Authorization" in info.value.message
        with pytest.raises(Unauthorized):
            TTAClient(http=c, api_key="wrong-key-0123456789").list_streams()
        acme = TTAClient(http=c, api_key=ACME_KEY)
        assert acme.create_stream("resnet20", "bn", stream_id="cam").tenant == "acme"
        admin_elsewhere = TTAClient(http=c, api_key=ADMIN_KEY, tenant="globex")
        with pytest.raises(NotFound):  # another tenant's stream is absent, not forbidden
            admin_elsewhere.get_stream("cam")
        assert TTAClient(http=c, api_key=ADMIN_KEY, tenant="acme").get_stream("cam").tenant == "acme"
        assert admin_elsewhere.list_streams(all_tenants=True).total == 1


# Retries and error mapping with a scripted transport.


def scripted(responses: list[httpx.Response | Exception]) -> tuple[httpx.Client, list[httpx.Request]]:
    """A client whose transport answers with ``responses`` in turn and records each request."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = responses[min(len(seen), len(responses)) - 1]
        if isinstance(item, Exception):
            raise item
        return item

    return httpx.Client(transport=httpx.MockTransport(handler), base_url="http://tta.test"), seen


def error(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"code": code, "message": f"{code} happened", "detail": None}}
    return httpx.Response(status, json=body, headers=headers)


OK_TEXT = httpx.Response(200, text="up 1")


def recorder() -> tuple[list[float], Callable[[float], None]]:
    waits: list[float] = []
    return waits, waits.append


def test_429_is_retried_after_the_servers_retry_after() -> None:
    http, seen = scripted([error(429, "queue_full", {"Retry-After": "2"}), OK_TEXT])
    waits, sleep = recorder()
    assert TTAClient(http=http, sleep=sleep).metrics() == "up 1"
    assert len(seen) == 2 and waits == [2.0]


def test_retries_are_bounded_with_exponential_backoff() -> None:
    http, seen = scripted([error(503, "store_unavailable")])
    waits, sleep = recorder()
    policy = RetryPolicy(max_attempts=4, backoff=0.25, jitter=False)
    with pytest.raises(StoreUnavailable) as info:
        TTAClient(http=http, retry=policy, sleep=sleep).get_stream("x")
    assert len(seen) == 4 and waits == [0.25, 0.5, 1.0] and info.value.status == 503


def test_waits_are_capped_and_jitter_stays_below_the_ceiling() -> None:
    policy = RetryPolicy(backoff=1.0, max_backoff=3.0, max_wait=5.0)
    huge = QueueFull(429, "queue_full", "full", retry_after=3600)
    assert policy.wait(huge, 1) == 5.0
    plain = QueueFull(429, "queue_full", "full")
    assert all(0 <= policy.wait(plain, 10) <= 3.0 for _ in range(50))
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_only_safe_failures_are_retried() -> None:
    _, sleep = recorder()
    http, seen = scripted([httpx.ConnectError("refused"), OK_TEXT])
    with pytest.raises(ConnectFailed):
        TTAClient(http=http, sleep=sleep).health()  # a liveness probe reports; it does not retry
    assert len(seen) == 1
    http, seen = scripted([httpx.ConnectError("refused"), OK_TEXT])
    assert TTAClient(http=http, sleep=sleep).metrics() == "up 1"  # never reached a server: safe to resend
    assert len(seen) == 2
    http, seen = scripted([httpx.ReadTimeout("slow"), OK_TEXT])
    with pytest.raises(ClientTimeout) as timeout:
        TTAClient(http=http, sleep=sleep).predict("s", random_images(1))
    assert len(seen) == 1 and timeout.value.status == 0  # the server may have adapted: never sent twice
    http, seen = scripted([error(422, "validation_error"), OK_TEXT])
    with pytest.raises(Invalid):
        TTAClient(http=http, sleep=sleep).get_stream("s")
    assert len(seen) == 1


def test_connect_failures_surface_after_the_last_attempt() -> None:
    http, seen = scripted([httpx.ConnectError("refused")])
    with pytest.raises(ConnectFailed) as info:
        TTAClient(http=http, retry=RetryPolicy(max_attempts=2), sleep=lambda _: None).get_stream("s")
    assert len(seen) == 2 and info.value.code == "connect_failed" and isinstance(info.value.__cause__, httpx.HTTPError)


def test_non_api_error_bodies_map_by_status() -> None:
    cases: list[tuple[httpx.Response, type[TTAClientError]]] = [
        (httpx.Response(502, text="<html>bad gateway</html>"), ServerError),
        (httpx.Response(504, text="gateway timeout"), DeadlineExceeded),
        (error(504, "deadline_exceeded"), DeadlineExceeded),
        (httpx.Response(418, text="teapot"), tta_client.BadRequest),
    ]
    for response, cls in cases:
        http, _ = scripted([response])
        with pytest.raises(cls) as info:
            TTAClient(http=http, retry=RetryPolicy.never()).get_stream("s")
        assert info.value.status == response.status_code


def test_retry_after_parses_seconds_and_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait


def test_every_server_error_code_has_a_client_exception() -> None:
    codes = {
        cls.code
        for cls in vars(server_errors).values()
        if isinstance(cls, type) and issubclass(cls, server_errors.ServiceError)
    }
    assert codes <= set(BY_CODE), codes - set(BY_CODE)
    for code, cls in BY_CODE.items():
        assert issubclass(cls, TTAClientError), code


def test_response_models_mirror_the_server_schemas() -> None:
    pairs: list[tuple[type[BaseModel], type[BaseModel]]] = [
        (schemas.Health, client_types.Health),
        (schemas.Readiness, client_types.Readiness),
        (schemas.ModelInfo, client_types.ModelInfo),
        (schemas.MethodInfo, client_types.MethodInfo),
        (schemas.WindowOut, client_types.Window),
        (schemas.DriftOut, client_types.Drift),
        (schemas.StreamOut, client_types.Stream),
        (schemas.StreamPage, client_types.StreamPage),
        (schemas.TopK, client_types.TopK),
        (schemas.Prediction, client_types.Prediction),
        (schemas.PredictResponse, client_types.PredictResult),
        (schemas.ResetResponse, client_types.ResetResult),
        (schemas.StateImported, client_types.StateImported),
    ]
    for server, client in pairs:
        assert set(server.model_fields) == set(client.model_fields), server.__name__
        for name, info in server.model_fields.items():
            assert info.is_required() == client.model_fields[name].is_required(), f"{server.__name__}.{name}"


def test_importing_the_client_does_not_import_torch() -> None:
    code = "import sys, tta_client, tta_client.aio; print('torch' in sys.modules, 'tta_server' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    assert tta_client.__file__ is not None and "clients" in tta_client.__file__


# --- parameters, URLs in transport errors, request ids, dependency ranges -----------------


def test_parameters_returns_safetensors_and_their_version(api: TTAClient) -> None:
    from safetensors.numpy import load

    api.create_stream("resnet20", "tent", stream_id="edge")
    api.predict("edge", random_images(8))
    params = api.parameters("edge")
    assert isinstance(params, tta_client.ParametersExport) and params.stream_id == "edge"
    assert params.version == api.get_stream("edge").version >= 1
    tensors = load(params.data)
    assert tensors and all(name.endswith((".weight", ".bias")) for name in tensors)
    with pytest.raises(NotFound):
        api.parameters("nope")


def test_connect_failures_name_the_url() -> None:
    with (
        TTAClient("http://127.0.0.1:9", retry=RetryPolicy.never(), timeout=5) as tta,
        pytest.raises(ConnectFailed) as info,
    ):
        tta.get_stream("cam-7")
    assert "http://127.0.0.1:9/v1/streams/cam-7" in str(info.value)
    assert info.value.detail == {"url": "http://127.0.0.1:9/v1/streams/cam-7"}


def test_timeouts_name_the_url_and_the_request_id_sent() -> None:
    http, _ = scripted([httpx.ReadTimeout("slow")])
    tta = TTAClient(http=http, headers={"x-request-id": "req-42"}, retry=RetryPolicy.never())
    with pytest.raises(ClientTimeout) as info:
        tta.get_stream("s")
    assert "GET http://tta.test/v1/streams/s" in info.value.message and info.value.request_id == "req-42"


def test_request_id_of_the_answer_is_in_the_exception() -> None:
    http, _ = scripted([error(404, "not_found", headers={"x-request-id": "abc123"})])
    with pytest.raises(NotFound) as info:
        TTAClient(http=http, retry=RetryPolicy.never()).get_stream("s")
    assert info.value.request_id == "abc123" and "(request id abc123)" in str(info.value)
    body = {"error": {"code": "conflict", "message": "taken", "detail": None, "request_id": "from-body"}}
    http, _ = scripted([httpx.Response(409, json=body)])
    with pytest.raises(Conflict) as conflict:
        TTAClient(http=http, retry=RetryPolicy.never()).get_stream("s")
    assert conflict.value.request_id == "from-body"
    http, _ = scripted([error(422, "validation_error")])
    with pytest.raises(Invalid) as plain:
        TTAClient(http=http, retry=RetryPolicy.never()).get_stream("s")
    assert plain.value.request_id is None and "request id" not in str(plain.value)


def test_client_dependencies_are_ranges_not_pins() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "clients" / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"]) + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    assert requirements
    for requirement in requirements:
        assert "==" not in requirement and ">=" in requirement and "<" in requirement, requirement
