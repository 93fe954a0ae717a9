"""The asyncio client: the same methods as :class:`~tta_client.client.TTAClient`, awaitable.

One ``AsyncTTAClient`` can carry many concurrent requests (the load tool drives dozens of
streams through one); requests and parsing are shared with the sync client (``_calls``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx

from tta_client import _calls
from tta_client.client import DEFAULT_URL, auth_headers
from tta_client.errors import TTAClientError, error_from_response, error_from_transport
from tta_client.images import Encoding, Images
from tta_client.retry import RetryPolicy
from tta_client.types import (
    Drift,
    MethodInfo,
    ModelInfo,
    ParametersExport,
    PredictResult,
    Readiness,
    ResetResult,
    StateExport,
    StateImported,
    Stream,
    StreamPage,
)

T = TypeVar("T")


class AsyncTTAClient:
    """Calls one tta-server from asyncio code; see :class:`~tta_client.client.TTAClient` for the arguments."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        tenant: str | None = None,
        timeout: float | httpx.Timeout = 30.0,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        http: httpx.AsyncClient | None = None,
        limits: httpx.Limits | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._owns_http = http is None
        if http is None:
            http = httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits or httpx.Limits())
        self._http = http
        self._headers = auth_headers(api_key, tenant, headers)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncTTAClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, call: _calls.Call[T]) -> T:
        """Send ``call``, retrying per the policy; its parsed answer or a :class:`TTAClientError`."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.send(call.build(self._http, self._headers))
            except httpx.TransportError as exc:
                error: TTAClientError = error_from_transport(exc)
                error.__cause__ = exc
            else:
                if response.is_success or response.status_code in call.accept:
                    return call.parse(response)
                error = error_from_response(response)
            if not (call.retry and self.retry.should_retry(error, attempt)):
                raise error
            await self._sleep(self.retry.wait(error, attempt))

    async def health(self) -> bool:
        return (await self.send(_calls.health())).status == "ok"

    async def ready(self) -> Readiness:
        return await self.send(_calls.ready())

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> Readiness:
        """Poll ``/readyz`` until ready; raise :class:`TTAClientError` (code ``not_ready``) at ``timeout``."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                report = await self.ready()
                if report.ready:
                    return report
                last = "; ".join(report.problems) or report.status
            except TTAClientError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise TTAClientError(503, "not_ready", f"server not ready after {timeout:.0f} s: {last}")
            await self._sleep(interval)

    async def metrics(self) -> str:
        return await self.send(_calls.metrics())

    async def models(self) -> list[ModelInfo]:
        return await self.send(_calls.models())

    async def methods(self) -> list[MethodInfo]:
        return await self.send(_calls.methods())

    async def create_stream(
        self,
        model: str,
        method: str,
        config: dict[str, Any] | None = None,
        *,
        stream_id: str | None = None,
        seed: int = 0,
        metadata: dict[str, str] | None = None,
    ) -> Stream:
        return await self.send(_calls.create_stream(model, method, config, stream_id, seed, metadata))

    async def list_streams(self, offset: int = 0, limit: int = 100, *, all_tenants: bool = False) -> StreamPage:
        return await self.send(_calls.list_streams(offset, limit, all_tenants))

    async def iter_streams(self, page_size: int = 100, *, all_tenants: bool = False) -> AsyncIterator[Stream]:
        offset = 0
        while True:
            page = await self.list_streams(offset, page_size, all_tenants=all_tenants)
            for stream in page.streams:
                yield stream
            offset += len(page.streams)
            if not page.streams or offset >= page.total:
                return

    async def get_stream(self, stream_id: str) -> Stream:
        return await self.send(_calls.get_stream(stream_id))

    async def delete_stream(self, stream_id: str) -> None:
        await self.send(_calls.delete_stream(stream_id))

    async def reset_stream(self, stream_id: str) -> ResetResult:
        return await self.send(_calls.reset_stream(stream_id))

    async def predict(
        self,
        stream_id: str,
        images: Images,
        *,
        adapt: bool = True,
        top_k: int = 5,
        encoding: Encoding = "multipart",
        timeout: float | None = None,
    ) -> PredictResult:
        return await self.send(_calls.predict(stream_id, images, adapt, top_k, encoding, timeout))

    async def export_state(self, stream_id: str) -> StateExport:
        return await self.send(_calls.export_state(stream_id))

    async def parameters(self, stream_id: str) -> ParametersExport:
        """The stream's adapted parameters as safetensors bytes under the model's own names, for an edge device."""
        return await self.send(_calls.parameters(stream_id))

    async def import_state(self, stream_id: str, data: bytes | StateExport) -> StateImported:
        blob = data.data if isinstance(data, StateExport) else data
        return await self.send(_calls.import_state(stream_id, blob))

    async def drift(self, stream_id: str) -> Drift:
        return await self.send(_calls.drift(stream_id))
