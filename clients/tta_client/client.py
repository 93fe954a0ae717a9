"""The synchronous client: one method per endpoint, typed answers, retries, timeouts.

    with TTAClient("http://127.0.0.1:8000", api_key="...") as tta:
        stream = tta.create_stream("resnet20", "bn", stream_id="cam-7")
        result = tta.predict("cam-7", batch)          # uint8 N x H x W x 3, paths or bytes
        print(result.labels, tta.drift("cam-7").short.entropy_mean)

Errors raise subclasses of :class:`~tta_client.errors.TTAClientError` (see that module for
the tree). 429 and 503 answers are retried per :class:`~tta_client.retry.RetryPolicy`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx

from tta_client import _calls
from tta_client._version import __version__
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
DEFAULT_URL = "http://127.0.0.1:8000"


def auth_headers(api_key: str | None, tenant: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    """Headers sent with every request: identity, API key, and (admin keys) the tenant to act in."""
    headers = {"user-agent": f"tta-client/{__version__}", **(extra or {})}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    if tenant:
        headers["x-tenant"] = tenant
    return headers


class TTAClient:
    """Calls one tta-server. Thread-safe as long as the underlying ``httpx.Client`` is.

    ``http`` lets you bring a configured ``httpx.Client`` (proxies, TLS, a test client); its
    base URL is used and it is not closed by :meth:`close`. ``timeout`` is in seconds for
    connect, read and write each. ``sleep`` is injectable so tests need not wait.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        tenant: str | None = None,
        timeout: float | httpx.Timeout = 30.0,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(base_url=base_url, timeout=timeout)
        self._headers = auth_headers(api_key, tenant, headers)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> TTAClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, call: _calls.Call[T]) -> T:
        """Send ``call``, retrying per the policy; its parsed answer or a :class:`TTAClientError`."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.send(call.build(self._http, self._headers))
            except httpx.TransportError as exc:
                error: TTAClientError = error_from_transport(exc)
                error.__cause__ = exc
            else:
                if response.is_success or response.status_code in call.accept:
                    return call.parse(response)
                error = error_from_response(response)
            if not (call.retry and self.retry.should_retry(error, attempt)):
                raise error
            self._sleep(self.retry.wait(error, attempt))

    # health and catalogue

    def health(self) -> bool:
        """True when the server process answers (liveness)."""
        return self.send(_calls.health()).status == "ok"

    def ready(self) -> Readiness:
        """The readiness report; ``.ready`` is False (not an exception) while the server answers 503."""
        return self.send(_calls.ready())

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> Readiness:
        """Poll ``/readyz`` until ready; raise :class:`TTAClientError` (code ``not_ready``) at ``timeout``."""
        deadline = time.monotonic() + timeout
        last: str = "no answer"
        while True:
            try:
                report = self.ready()
                if report.ready:
                    return report
                last = "; ".join(report.problems) or report.status
            except TTAClientError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise TTAClientError(503, "not_ready", f"server not ready after {timeout:.0f} s: {last}")
            self._sleep(interval)

    def metrics(self) -> str:
        """The Prometheus exposition text of ``/metrics``."""
        return self.send(_calls.metrics())

    def models(self) -> list[ModelInfo]:
        """The server's model catalogue."""
        return self.send(_calls.models())

    def methods(self) -> list[MethodInfo]:
        """The adaptation methods with their config schemas and defaults."""
        return self.send(_calls.methods())

    # streams

    def create_stream(
        self,
        model: str,
        method: str,
        config: dict[str, Any] | None = None,
        *,
        stream_id: str | None = None,
        seed: int = 0,
        metadata: dict[str, str] | None = None,
    ) -> Stream:
        """Register a stream; :class:`Invalid` for an unknown model/method or bad config, :class:`Conflict` if taken."""
        return self.send(_calls.create_stream(model, method, config, stream_id, seed, metadata))

    def list_streams(self, offset: int = 0, limit: int = 100, *, all_tenants: bool = False) -> StreamPage:
        """One page of streams (this tenant's, or every tenant's for an admin key with ``all_tenants``)."""
        return self.send(_calls.list_streams(offset, limit, all_tenants))

    def iter_streams(self, page_size: int = 100, *, all_tenants: bool = False) -> Iterator[Stream]:
        """Every stream, fetching pages of ``page_size`` as needed."""
        offset = 0
        while True:
            page = self.list_streams(offset, page_size, all_tenants=all_tenants)
            yield from page.streams
            offset += len(page.streams)
            if not page.streams or offset >= page.total:
                return

    def get_stream(self, stream_id: str) -> Stream:
        return self.send(_calls.get_stream(stream_id))

    def delete_stream(self, stream_id: str) -> None:
        """Delete a stream and its state (:class:`NotFound` if absent)."""
        self.send(_calls.delete_stream(stream_id))

    def reset_stream(self, stream_id: str) -> ResetResult:
        """Put the stream's adapted state back to source; the step counter keeps counting."""
        return self.send(_calls.reset_stream(stream_id))

    def predict(
        self,
        stream_id: str,
        images: Images,
        *,
        adapt: bool = True,
        top_k: int = 5,
        encoding: Encoding = "multipart",
        timeout: float | None = None,
    ) -> PredictResult:
        """Adapted predictions for ``images``, in order.

        ``images``: a uint8 array (H x W x 3 or N x H x W x 3) or list of arrays, sent as .npy;
        or encoded images (bytes) or file paths, sent as multipart (``encoding="json"``: base64).
        ``adapt=False`` predicts with the current state without updating it.
        """
        return self.send(_calls.predict(stream_id, images, adapt, top_k, encoding, timeout))

    def export_state(self, stream_id: str) -> StateExport:
        """The stream's adapted state as safetensors bytes (a backup)."""
        return self.send(_calls.export_state(stream_id))

    def parameters(self, stream_id: str) -> ParametersExport:
        """The stream's adapted parameters as safetensors bytes under the model's own names, for an edge device."""
        return self.send(_calls.parameters(stream_id))

    def import_state(self, stream_id: str, data: bytes | StateExport) -> StateImported:
        """Restore a state onto a stream of the same model weights, method and config (else :class:`Invalid`)."""
        blob = data.data if isinstance(data, StateExport) else data
        return self.send(_calls.import_state(stream_id, blob))

    def drift(self, stream_id: str) -> Drift:
        """The stream's drift signals (entropy, confidence, class shift, disagreement, BN shift, resets)."""
        return self.send(_calls.drift(stream_id))
