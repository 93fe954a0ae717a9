"""The hot path of ``POST /v1/streams/{id}/predict`` as a pure ASGI component, beside the FastAPI route.

Why: many streams that each send one small image make the per-request framework cost the
bottleneck, not the model. Profiled at 64 streams x 1 image (benchmarks/results/fused_streams.md),
most of the event loop's CPU per request went to FastAPI's routing, dependency solving and
middleware layers rather than to decoding, queueing or answering. This component answers the
common case directly, with the same functions the route calls (admission, decoding, the stream
service, the answer's JSON, the error shape), so the two cannot drift apart:

- a ``POST`` to ``/v1/streams/{id}/predict`` with a ``.npy`` body (:data:`NPY_TYPES`);
- a query string of at most ``adapt`` (``true``/``false``/``1``/``0``) and ``top_k`` (1-1000), each once;
- credentials and ``X-Tenant`` that :func:`tta_server.auth.authenticate` and the tenant check accept;
- tracing off (the route records the request's spans).

Anything else (another media type, an unusual or invalid query, a missing or wrong key, a bad
tenant) is handed to the FastAPI app untouched, before a byte of the body was read, so every
refusal keeps the route's exact answer. It runs before the app's middleware stack (see
:class:`tta_server.app.ServerApp`), so it does what the stack's middlewares do for the route:
sets the request id (the client's when sane) for its log lines and answers it in ``X-Request-ID``,
and counts and times the answer under the route's template in ``tta_http_requests_total``.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect

from tta_server.api.body import read_asgi_body
from tta_server.api.deps import Services, resolve_principal
from tta_server.api.predict import NPY_TYPES, answer_json, decode_npy_request
from tta_server.auth import Principal
from tta_server.errors import ServiceError
from tta_server.observability import tracing
from tta_server.observability.request_id import (
    HEADER,
    HEADER_KEY,
    accept_request_id,
    request_id_text,
    reset_request_id,
    set_request_id,
)
from tta_server.serving.stream_service import PredictInput
from tta_server.state.base import StreamKey
from tta_server.zoo.catalogue import ModelSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.responses import Response
    from starlette.types import Receive, Scope, Send

ROUTE = "/v1/streams/{stream_id}/predict"
_PATH = re.compile(r"/v1/streams/([^/]+)/predict")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}
_JSON_HEADERS = [(b"content-type", b"application/json")]


def parse_query(query: bytes, default_top_k: int = 5) -> tuple[bool, int] | None:
    """``(adapt, top_k)`` when the query holds only simple, valid values of those two; None otherwise."""
    adapt, top_k = True, default_top_k
    if not query:
        return adapt, top_k
    seen: set[str] = set()
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            return None
        seen.add(name)
        if name == "adapt" and value.lower() in _BOOLS:
            adapt = _BOOLS[value.lower()]
        elif name == "top_k" and value.isascii() and value.isdigit() and 1 <= int(value) <= 1000:
            top_k = int(value)
        else:
            return None
    return adapt, top_k


def npy_request_headers(scope: Scope) -> dict[bytes, bytes] | None:
    """The headers this path reads (lower-case names, ``X-Request-ID`` included: one scan of the headers) of a
    ``.npy`` body; None when the body is of another media type or one of them is repeated (the route decides then)."""
    wanted = (b"content-type", b"content-length", b"authorization", b"x-tenant", HEADER_KEY)
    found: dict[bytes, bytes] = {}
    for key, value in scope.get("headers", ()):
        if key in wanted:
            if key in found:
                return None
            found[key] = value
    content_type = found.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
    return found if content_type in NPY_TYPES else None


class FastPredict:
    """Answers the common ``.npy`` predict request itself (:meth:`serve`); the caller hands the rest to the app."""

    def __init__(self, services: Services, error_response: Callable[[Exception, str], Response]) -> None:
        self.services = services
        self.error_response = error_response

    def _ours(self, scope: Scope) -> tuple[StreamKey, bool, int, dict[bytes, bytes]] | None:
        """The stream, options and headers of a request this path serves; None to hand it to the app."""
        if scope["type"] != "http" or scope["method"] != "POST" or tracing.enabled():
            return None
        match = _PATH.fullmatch(scope["path"])
        if match is None:
            return None
        headers = npy_request_headers(scope)
        if headers is None:
            return None
        options = parse_query(scope.get("query_string", b""))
        if options is None:
            return None
        principal = self._principal(headers)
        if principal is None:
            return None
        return StreamKey(principal.tenant, match.group(1)), options[0], options[1], headers

    def _principal(self, headers: dict[bytes, bytes]) -> Principal | None:
        """The caller, or None when the route must answer (it refuses with the exact 401 or 422)."""
        try:
            authorization = headers[b"authorization"].decode("latin-1") if b"authorization" in headers else None
            tenant = headers[b"x-tenant"].decode("latin-1") if b"x-tenant" in headers else None
            return resolve_principal(self.services.settings.api_keys, authorization, tenant)
        except ServiceError:
            return None

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer the request and return True, or return False, having read nothing, when it is not ours."""
        ours = self._ours(scope)
        if ours is None:
            return False
        started = time.perf_counter()
        request_id = accept_request_id(request_id_text(ours[3].get(HEADER_KEY)))
        status = 500
        token = set_request_id(request_id)  # use_request_id's work without a generator per request
        try:
            status = await self._answer(scope, receive, send, ours, request_id.encode("ascii"))
        finally:
            self.services.metrics.record_request(ROUTE, "POST", status, time.perf_counter() - started)
            reset_request_id(token)
        return True

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ours: tuple[StreamKey, bool, int, dict[bytes, bytes]],
        request_id: bytes,
    ) -> int:
        """Predict and send the answer (or the route's error answer); the status sent."""
        key, adapt, top_k, headers = ours
        services = self.services
        declared = headers[b"content-length"].decode("latin-1") if b"content-length" in headers else None

        async def decode(spec: ModelSpec) -> PredictInput:
            body = await read_asgi_body(receive, declared, services.limits.max_body_bytes)
            return await decode_npy_request(body, spec, services)

        try:
            outcome = await services.streams.predict(key, decode, adapt, top_k)
            payload = answer_json(key.stream_id, outcome)
        except ClientDisconnect:
            return 499  # nobody to answer; counted like uvicorn's access log would show a dropped client
        except Exception as exc:  # the route's error shape, from the same function
            response = self.error_response(exc, scope["path"])
            response.headers[HEADER] = request_id.decode("ascii")
            await response(scope, receive, send)
            return response.status_code
        head = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode()), (HEADER_KEY, request_id)]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": payload})
        return 200
