"""Optional OpenTelemetry spans for one request: the request, decode, queue wait, batch, step, store write.

Tracing is off unless the ``otel`` extra is installed (``pip install 'tta-server[otel]'``) and
either ``TTA_TRACING=on`` or, with the default ``TTA_TRACING=auto``, one of the standard
variables asks for it: ``OTEL_TRACES_EXPORTER`` (other than ``none``),
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``. Where spans go is
then the OpenTelemetry SDK's own business, read from the same standard variables
(``OTEL_TRACES_EXPORTER=otlp|console``, ``OTEL_EXPORTER_OTLP_*``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SDK_DISABLED``).

Why the indirection: the request path is performance-critical and must run without
opentelemetry installed. :func:`span` returns one shared no-op context manager while tracing is
off (one global read per call), and nothing here imports opentelemetry until tracing is
switched on.

The spans of one predict request, and their parents::

    POST /v1/streams/{stream_id}/predict        (SERVER; parent: the caller's traceparent, if any)
      ├─ tta.decode                             body -> uint8 images
      ├─ tta.queue_wait                         queued -> its batch starts (recorded afterwards)
      └─ tta.batch                              the batch that served it, on the model worker thread
           ├─ tta.store.read                    the stream's state
           ├─ tta.step                          adapter.step (the forward pass and the update)
           └─ tta.store.write                   the compare-and-set write of the new state

A batch that coalesced several requests is a child of its first request's span (the worker
runs in that request's context). Other threads get the context explicitly: the batcher and
the store pool run their calls inside a copy of the submitting request's
:mod:`contextvars` context.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal

from tta_server.observability.request_id import current_request_id

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

TracingMode = Literal["auto", "on", "off"]
AttributeValue = str | bool | int | float
INSTRUMENTATION_NAME = "tta_server"
SERVICE_NAME = "tta-server"

_NOOP: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: Tracer | None = None
_provider: Any = None  # the SDK provider this module made (shut down on reconfiguration)


def enabled() -> bool:
    """Whether spans are being recorded."""
    return _tracer is not None


def span(name: str, attributes: Mapping[str, AttributeValue] | None = None) -> AbstractContextManager[Any]:
    """A span around a block, current for the block's duration; a shared no-op while tracing is off."""
    tracer = _tracer
    if tracer is None:
        return _NOOP
    return tracer.start_as_current_span(name, attributes=attributes)


def record_span(name: str, start_ns: int, end_ns: int, attributes: Mapping[str, AttributeValue] | None = None) -> None:
    """A span for an interval that was measured rather than wrapped (a wait), a child of the current span.

    ``start_ns``/``end_ns`` are ``time.time_ns()`` values. No-op while tracing is off.
    """
    tracer = _tracer
    if tracer is None:
        return
    recorded = tracer.start_span(name, start_time=start_ns, attributes=attributes)
    recorded.end(end_time=max(start_ns, end_ns))


def use_provider(provider: TracerProvider | None) -> None:
    """Record spans with ``provider`` (tests pass one with an in-memory exporter); None switches tracing off."""
    global _tracer  # noqa: PLW0603 - one process-wide switch, read on every span
    _tracer = provider.get_tracer(INSTRUMENTATION_NAME) if provider is not None else None


def wanted(mode: TracingMode, environ: Mapping[str, str]) -> bool:
    """Whether ``mode`` and the standard OTEL_* variables ask for tracing."""
    if mode == "off" or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if mode == "on":
        return True
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter and exporter != "none":
        return True
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporters(environ: Mapping[str, str]) -> list[Any]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names (default ``otlp``, over HTTP/protobuf unless
    ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL=grpc``); each exporter reads its own OTEL_EXPORTER_* variables."""
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    exporters: list[Any] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol.strip().lower() == "grpc":
                try:
                    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                        OTLPSpanExporter as GrpcExporter,
                    )
                except ImportError as exc:
                    raise RuntimeError(
                        "OTLP over gRPC needs opentelemetry-exporter-otlp-proto-grpc; "
                        "or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"
                    ) from exc
                exporters.append(GrpcExporter())
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporters.append(OTLPSpanExporter())
        else:
            raise RuntimeError(f"OTEL_TRACES_EXPORTER={name!r} is not supported here; use otlp, console or none")
    return exporters


def configure(mode: TracingMode, environ: Mapping[str, str] | None = None) -> bool:
    """Switch tracing on or off for this process from ``mode`` and the OTEL_* variables; True when on.

    With ``mode="auto"`` and no OTEL variable set, or without the ``otel`` extra installed,
    tracing stays off (a warning says why when the variables asked for it). ``mode="on"``
    without the extra is an error: the operator asked for something this install cannot do.
    """
    global _provider  # noqa: PLW0603 - the provider this module owns
    environ = os.environ if environ is None else environ
    if _provider is not None:
        _provider.shutdown()
        _provider = None
    if not wanted(mode, environ):
        use_provider(None)
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        if mode == "on":
            raise RuntimeError("tracing=on needs the otel extra: pip install 'tta-server[otel]'") from None
        log.warning("OTEL_* variables ask for traces, but opentelemetry-sdk is not installed; tracing is off")
        use_provider(None)
        return False
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = SdkTracerProvider(resource=Resource.create(attributes))
    for exporter in _exporters(environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    use_provider(provider)
    return True


class TracingMiddleware:
    """Pure ASGI middleware: one SERVER span per HTTP request, continuing the caller's W3C ``traceparent``.

    Passes straight through while tracing is off. The span is named ``"<METHOD> <route template>"``
    once routing is done (bounded names: never the stream id), and carries the status code and
    the request id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = _tracer
        if tracer is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, StatusCode

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        method = str(scope.get("method", "GET"))
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        attributes: dict[str, AttributeValue] = {"http.request.method": method, "url.path": str(scope.get("path"))}
        request_id = current_request_id()
        if request_id is not None:
            attributes["tta.request_id"] = request_id
        with tracer.start_as_current_span(
            method, context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=attributes
        ) as server_span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route is not None:
                    server_span.update_name(f"{method} {route}")
                    server_span.set_attribute("http.route", route)
                server_span.set_attribute("http.response.status_code", status)
                if status >= 500 or status == 0:
                    server_span.set_status(StatusCode.ERROR)
