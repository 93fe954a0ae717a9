"""A small synchronous client for the tta-server HTTP API."""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import BaseModel


class TTAClientError(Exception):
    """An error response from the server, with the API's error code and message."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


class ModelInfo(BaseModel):
    """One catalogue entry as the server reports it."""

    name: str
    arch: str
    norm: str | None
    classes: list[str]
    input_size: int
    mean: list[float]
    std: list[float]
    weights_sha256: str | None
    clean_top1: float | None


class TTAClient:
    """Calls a tta-server; pass ``http`` to reuse a configured ``httpx.Client``."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", timeout: float = 30.0, http: httpx.Client | None = None
    ):
        self._http = http or httpx.Client(base_url=base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TTAClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str) -> Any:
        response = self._http.get(path)
        if response.is_error:
            raise _error(response)
        return response.json()

    def health(self) -> bool:
        """True when the server process answers."""
        return bool(self._get("/healthz")["status"] == "ok")

    def ready(self) -> dict[str, Any]:
        """The readiness report; raises :class:`TTAClientError` (503) when not ready."""
        report: dict[str, Any] = self._get("/readyz")
        return report

    def models(self) -> list[ModelInfo]:
        """The server's model catalogue."""
        return [ModelInfo.model_validate(m) for m in self._get("/v1/models")["models"]]


def _error(response: httpx.Response) -> TTAClientError:
    try:
        body = response.json()["error"]
        return TTAClientError(response.status_code, body["code"], body["message"], body.get("detail"))
    except (ValueError, KeyError, TypeError):
        return TTAClientError(response.status_code, "http_error", response.text[:200])
