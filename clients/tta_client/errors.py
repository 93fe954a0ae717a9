"""The client's exception tree, mirroring the server's error codes in one table.

Every failure the client raises is a :class:`TTAClientError`, so one ``except`` clause
covers HTTP errors and transport failures alike. HTTP errors carry what the server sent in
its one error shape ``{"error": {"code", "message", "detail"}}``; the subclass is chosen by
``code`` first (stable, machine-readable) and by the HTTP status only when the body is not
the server's shape (a proxy's 502 page, say), so a load balancer in front still maps sanely.

    TTAClientError
    ├── TransportError              no HTTP answer (status 0); the server may have run the request
    │   ├── ConnectFailed           never reached a server: refused, DNS, connect or pool timeout
    │   └── ClientTimeout           the client's read or write timeout elapsed
    ├── BadRequest                  4xx without a more specific class
    │   ├── Unauthorized            401 unauthorized
    │   ├── NotFound                404 not_found
    │   ├── MethodNotAllowed        405 method_not_allowed
    │   ├── Conflict                409 conflict
    │   ├── PayloadTooLarge         413 payload_too_large
    │   ├── UnsupportedMedia        415 unsupported_media_type
    │   ├── Invalid                 422 validation_error
    │   └── QueueFull               429 queue_full (``retry_after`` seconds)
    └── ServerError                 5xx without a more specific class
        ├── ServiceUnavailable      503
        │   ├── NotReady            503 not_ready
        │   └── StoreUnavailable    503 store_unavailable
        └── DeadlineExceeded        504 deadline_exceeded
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx


class TTAClientError(Exception):
    """Base of every client error: HTTP ``status`` (0 without an answer), API ``code``, ``message``, ``detail``.

    ``request_id`` is the server's ``X-Request-ID`` for the failed request (the header, or the
    error body's ``request_id``), or, without an answer, the ``X-Request-ID`` the request was
    sent with; it is what to search the server's logs for, so ``str(error)`` shows it too.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        text = f"{status} {code}: {message}" if status else f"{code}: {message}"
        super().__init__(f"{text} (request id {request_id})" if request_id else text)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.retry_after = retry_after
        self.request_id = request_id


class TransportError(TTAClientError):
    """No HTTP answer arrived (connection refused or reset, name resolution, protocol error)."""


class ConnectFailed(TransportError):  # noqa: N818 - the API's names, as in httpx
    """The request never reached a server, so sending it again is always safe."""


class ClientTimeout(TransportError):  # noqa: N818 - the API's names, as in httpx
    """The client's own read or write timeout elapsed; the server may still have run the request."""


class BadRequest(TTAClientError):  # noqa: N818 - the API's names, as in httpx
    """A 4xx answer: the request must change before it can succeed (429 aside)."""


class Unauthorized(BadRequest):
    """401: missing, malformed or unknown API key."""


class NotFound(BadRequest):
    """404: no such stream (in this tenant) or route."""


class MethodNotAllowed(BadRequest):
    """405: the route exists but not with this HTTP method."""


class Conflict(BadRequest):
    """409: the stream id is taken, or a concurrent writer won a version race."""


class PayloadTooLarge(BadRequest):
    """413: body, image count or pixel count beyond the server's limits."""


class UnsupportedMedia(BadRequest):
    """415: content type not accepted, or an image that is not PNG, JPEG or WebP."""


class Invalid(BadRequest):
    """422: the request is well-formed but its values are not (``detail`` lists field errors)."""


class QueueFull(BadRequest):
    """429: the server's bounded queue is full; retry after ``retry_after`` seconds."""


class ServerError(TTAClientError):
    """A 5xx answer: the server (or something in front of it) failed."""


class ServiceUnavailable(ServerError):  # noqa: N818 - the API's names, as in httpx
    """503: the server cannot serve right now."""


class NotReady(ServiceUnavailable):
    """503 not_ready: models still loading or failed to load."""


class StoreUnavailable(ServiceUnavailable):
    """503 store_unavailable: the state store (Redis) cannot be reached."""


class DeadlineExceeded(ServerError):  # noqa: N818 - the API's names, as in httpx
    """504: the request waited in the server's queue past its deadline and was not run."""


BY_CODE: dict[str, type[TTAClientError]] = {
    "unauthorized": Unauthorized,
    "not_found": NotFound,
    "method_not_allowed": MethodNotAllowed,
    "conflict": Conflict,
    "payload_too_large": PayloadTooLarge,
    "unsupported_media_type": UnsupportedMedia,
    "validation_error": Invalid,
    "queue_full": QueueFull,
    "not_ready": NotReady,
    "store_unavailable": StoreUnavailable,
    "deadline_exceeded": DeadlineExceeded,
    "internal_error": ServerError,
}
"""The API's error codes (tta_server/errors.py) and the class each becomes."""

BY_STATUS: dict[int, type[TTAClientError]] = {
    401: Unauthorized,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMedia,
    422: Invalid,
    429: QueueFull,
    503: ServiceUnavailable,
    504: DeadlineExceeded,
}
"""Fallback when the body is not the server's error shape (a proxy answered)."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(response: httpx.Response) -> TTAClientError:
    """The exception for an error ``response``, by API code, else by HTTP status."""
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()["error"]
        code, message, detail = str(body["code"]), str(body["message"]), body.get("detail")
        request_id = request_id or (str(body["request_id"]) if body.get("request_id") else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message, detail = "http_error", response.text[:500] or response.reason_phrase, None
    cls = BY_CODE.get(code) or BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else BadRequest
    return cls(status, code, message, detail, retry_after=retry_after, request_id=request_id)


def error_from_transport(exc: httpx.TransportError) -> TransportError:
    """The exception for a request that got no HTTP answer; the message and ``detail["url"]`` name the URL.

    httpx's own messages ("[Errno 111] Connection refused") do not say where the client tried
    to go, which is the first thing to check with a wrong base URL or port.
    """
    try:
        request: httpx.Request | None = exc.request
    except RuntimeError:  # raised by httpx when the error was not tied to a request
        request = None
    url = str(request.url) if request is not None else None
    request_id = request.headers.get("x-request-id") if request is not None else None
    where = f" {request.method} {url}" if request is not None else ""
    detail = {"url": url} if url is not None else None
    cause = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return ConnectFailed(0, "connect_failed", f"cannot connect for{where}: {cause}", detail, request_id=request_id)
    if isinstance(exc, httpx.TimeoutException):
        return ClientTimeout(0, "timeout", f"no answer in time to{where}: {cause}", detail, request_id=request_id)
    return TransportError(0, "transport_error", f"no answer to{where}: {cause}", detail, request_id=request_id)
