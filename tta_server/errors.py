"""The exception tree of the service and its single mapping to HTTP.

Every error response has one shape: ``{"error": {"code", "message", "detail", "request_id"}}``,
where ``code`` is a stable machine-readable string, ``message`` a sentence for a person,
``detail`` optional structured context (for example pydantic's field errors) and
``request_id`` the request's ``X-Request-ID`` (to find its log lines and trace).
"""

from __future__ import annotations

from typing import Any

from tta_server.observability.request_id import current_request_id


class ServiceError(Exception):
    """Base of every error the API turns into a JSON response."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_body(self) -> dict[str, Any]:
        body = {"code": self.code, "message": self.message, "detail": self.detail, "request_id": current_request_id()}
        return {"error": body}


class NotFoundError(ServiceError):
    status_code = 404
    code = "not_found"


class RequestInvalidError(ServiceError):
    status_code = 422
    code = "validation_error"


class NotReadyError(ServiceError):
    status_code = 503
    code = "not_ready"


class ConflictError(ServiceError):
    status_code = 409
    code = "conflict"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaError(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class UnauthorizedError(ServiceError):
    """No or a wrong API key. HTTP requires a 401 to name the scheme to use (RFC 9110, 11.6.1),
    so every answer carries ``WWW-Authenticate: <challenge>``."""

    status_code = 401
    code = "unauthorized"
    challenge = "Bearer"


class QueueFullError(ServiceError):
    """The bounded request queue is full; the client should retry after ``retry_after`` seconds."""

    status_code = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, {"retry_after_seconds": retry_after})
        self.retry_after = retry_after


class DeadlineExceededError(ServiceError):
    status_code = 504
    code = "deadline_exceeded"


class StoreDownError(ServiceError):
    status_code = 503
    code = "store_unavailable"
