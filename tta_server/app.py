"""The FastAPI application factory and the request path.

    POST /v1/streams/{id}/predict  (multipart images | JSON base64 | .npy batch)
      -> schema validation (422) -> decode + limits (413/415/422) -> preprocess (model's own transform)
      -> Batcher.submit: bounded per-process queue (429 + Retry-After when full), per-request deadline (504)
      -> collect: requests of the same stream coalesce into one adaptation batch (max_batch, max_delay)
      -> ModelWorker (one worker thread per device, never on the event loop)
           state = store.load(stream) or adapter.init_state(model)
           result = adapter.step(model, x, state)          # frozen shared model + per-stream tensors
           store.save(stream, result.state, expected_version)
           observers (metrics, drift) look at the finished step; they cannot fail it
      -> response (labels, class names, probabilities, entropy, stream step)

Routes parse and shape; :class:`~tta_server.serving.stream_service.StreamService` owns every
stream operation and runs every store call off the event loop. ``create_app(settings)`` builds
the process-wide services once (catalogue, model hub, state store, metrics, batcher), loads the
preloaded models in the worker thread during start-up, and maps every error to the one JSON
error shape in one place (:func:`install_error_handlers`). docs/architecture.md draws the
whole path with the module that owns each step.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.errors import AdapterError
from adapters.moments import warm_up as warm_up_moments
from tta_server.allocator import keep_freed_memory
from tta_server.api import docs_routes, health, methods_routes, models_routes, predict, streams, v2
from tta_server.api.deps import Services, StartupStatus, require_key
from tta_server.api.fast_predict import FastPredict
from tta_server.errors import (
    ConflictError,
    NotFoundError,
    QueueFullError,
    RequestInvalidError,
    ServiceError,
    StoreDownError,
    UnauthorizedError,
)
from tta_server.metrics import Metrics
from tta_server.models import ModelHub
from tta_server.observability import tracing
from tta_server.observability.request_id import RequestIdMiddleware, current_request_id
from tta_server.serving.batcher import Batcher
from tta_server.serving.decode import DecodePool, InputLimits
from tta_server.serving.drift import DriftTracker
from tta_server.serving.method_setup import setup_key
from tta_server.serving.model_worker import BatchOutput, ModelWorker
from tta_server.serving.observers import DriftObserver, MetricsObserver, Observers
from tta_server.serving.record_cache import RecordCache
from tta_server.serving.stream_service import StreamService
from tta_server.settings import Settings
from tta_server.state.base import (
    StoreUnavailableError,
    StreamExistsError,
    StreamNotFoundError,
    StreamRecord,
    VersionConflictError,
)
from tta_server.state.factory import open_store
from tta_server.zoo.catalogue import CatalogueError

log = logging.getLogger(__name__)


def _preload(services: Services) -> None:
    # the fused BN statistics kernel is compiled (or read from numba's cache) before /readyz says ready
    if services.hub.device == "cpu" and not warm_up_moments():
        log.info("numba not available: fused BN statistics use torch operations")
    for name in services.settings.preload_models:
        try:
            services.hub.get(name)
        except Exception as exc:
            log.error("cannot load model %s: %s", name, exc)
            services.startup.errors.append(f"model '{name}' failed to load: {exc}")
    services.startup.models_ready = True


def to_service_error(exc: Exception) -> ServiceError | None:
    """The HTTP meaning of an internal error, or None for a genuine server fault."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, StreamNotFoundError):
        return NotFoundError(str(exc))
    if isinstance(exc, (StreamExistsError, VersionConflictError)):
        return ConflictError(str(exc))
    if isinstance(exc, StoreUnavailableError):
        return StoreDownError(f"state store unavailable: {exc}")
    if isinstance(exc, (AdapterError, CatalogueError)):
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return RequestInvalidError(str(message), getattr(exc, "errors", None))
    return None


def respond(error: ServiceError, path: str = "") -> JSONResponse:
    """The one JSON error shape for ``error`` (with ``Retry-After`` for a full queue).

    Under ``/v2`` the same error is answered in the Open Inference Protocol's shape
    (:func:`tta_server.api.v2.error_answer`): V2 clients read ``{"error": "<message>"}``.
    """
    headers = {"Retry-After": str(int(error.retry_after + 0.999))} if isinstance(error, QueueFullError) else None
    if isinstance(error, UnauthorizedError):
        headers = {"WWW-Authenticate": error.challenge}
    if v2.is_v2(path):
        status, body = v2.error_answer(error.status_code, error.message)
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)


def error_response(exc: Exception, path: str = "") -> JSONResponse:
    """The answer to any exception: its HTTP meaning, or a logged 500 that names only the exception type."""
    mapped = to_service_error(exc)
    if mapped is None:
        log.exception("unhandled error", exc_info=exc)
        mapped = ServiceError(f"internal error: {type(exc).__name__}")
    return respond(mapped, path)


def install_error_handlers(app: FastAPI) -> None:
    """Map service, store, adapter, validation and HTTP errors to the one error shape."""

    async def _any_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, request.url.path)

    mapped_errors: tuple[type[Exception], ...] = (
        Exception,
        ServiceError,
        AdapterError,
        CatalogueError,
        StreamNotFoundError,
        StreamExistsError,
        VersionConflictError,
        StoreUnavailableError,
    )
    for cls in mapped_errors:
        app.add_exception_handler(cls, _any_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        fields = "; ".join(".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in errors)
        return respond(RequestInvalidError(f"invalid request: {fields}", errors), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body the framework could not parse (bad encoding, broken form)
            return respond(RequestInvalidError(f"malformed request body: {exc.detail}"), request.url.path)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        if v2.is_v2(request.url.path):
            status, body = v2.error_answer(exc.status_code, str(exc.detail))
            return JSONResponse(body, status_code=status, headers=exc.headers)
        return JSONResponse(
            {"error": {"code": code, "message": str(exc.detail), "detail": None, "request_id": current_request_id()}},
            status_code=exc.status_code,
            headers=exc.headers,  # 405 carries Allow
        )


class RequestMetricsMiddleware:
    """Pure ASGI middleware: counts and times every answer by route template, and answers server faults.

    Pure ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs the
    app in a task group behind memory streams and rebuilds the response, which cost a measured
    share of a single-image predict's CPU (benchmarks/results/request_path.md); here the status
    is read from the ``http.response.start`` message on its way out. An exception that escapes
    the routes before an answer started is answered with :func:`error_response` (a 500 in the
    one error shape) and counted like any other answer.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception as exc:  # a fault after the answer started cannot be answered again: it propagates
            await error_response(exc, str(scope.get("path", "")))(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.record_request(route, str(scope.get("method", "")), status, time.perf_counter() - started)


def install_metrics(app: FastAPI, metrics: Metrics) -> None:
    """Count and time every request by its route template (bounded labels) and serve /metrics.

    Server faults are answered here, inside the counting middleware (not by the outermost
    error middleware, which no inner middleware sees), so every 500 is counted like any answer.
    """
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    def _metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def group_key(record: StreamRecord) -> Hashable:
    """Streams that one ``adapter.step_many`` call can serve together: those of one method setup."""
    return setup_key(record.model, record.method, record.config)


def build_services(settings: Settings) -> Services:
    """Everything the app shares, built from the settings (no torch work yet)."""
    metrics = Metrics()
    hub = ModelHub.open(settings.models_dir, settings.model_config_file, settings.device)
    store = open_store(settings.store_options(), metrics, hub.device)
    drift = DriftTracker(sample_every=settings.drift_sample_every)
    observers = Observers([MetricsObserver(metrics), DriftObserver(drift, metrics)], metrics)
    autocast = None if settings.autocast == "off" else settings.autocast
    worker = ModelWorker(hub, store, observers, channels_last=settings.channels_last, autocast=autocast)

    # the one series of each unlabelled histogram, looked up once
    batch_images, batch_requests, batch_streams = (
        metrics.batch_images.labels(),
        metrics.batch_requests.labels(),
        metrics.batch_streams.labels(),
    )

    def on_batch(images: int, requests: int, streams: int) -> None:
        batch_images.observe(images)
        batch_requests.observe(requests)
        batch_streams.observe(streams)

    batcher: Batcher[BatchOutput] = Batcher(
        worker.run_jobs,
        max_batch=settings.max_batch_size,
        max_delay=settings.max_delay_ms / 1000,
        max_queue=settings.max_queue,
        timeout=settings.request_timeout_s,
        on_batch=on_batch,
        group_of=RecordCache(group_key) if settings.fuse_streams else None,  # asked for every request
        # a batch's state reads and writes run where the batch runs: never Redis I/O on the event loop
        inline_max_images=settings.inline_max_images if store.in_process else 0,
        inline_max_seconds=settings.inline_max_ms / 1000,
        gather_quiet=settings.gather_quiet_ms / 1000,
    )
    streams = StreamService(hub, store, worker, batcher, drift, metrics)
    metrics.track_gauge(metrics.queue_depth, lambda: batcher.depth)
    metrics.track_gauge(metrics.active_streams, streams.active_streams)
    limits = InputLimits(
        settings.max_body_bytes,
        settings.max_images_per_request,
        settings.max_pixels_per_image,
        settings.max_pixels_per_request,
    )
    decoder = DecodePool(settings.decode_threads)
    return Services(settings, streams, hub, metrics, limits, decoder, StartupStatus())


class ServerApp(FastAPI):
    """The FastAPI app, with the ``.npy`` predict fast path in front of its middleware stack.

    Why in front: with many streams that each send one small image, the framework's routing,
    dependency and middleware layers cost more CPU per request than decoding and answering it
    (benchmarks/results/fused_streams.md); :class:`FastPredict` serves that request itself, with
    the route's own functions, its request id and its metrics, and hands every other request
    to the stack untouched.
    """

    fast_path: FastPredict | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_path is not None and await self.fast_path.serve(scope, receive, send):
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    """Build the ASGI app for ``settings`` (nothing is built at import time)."""
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    if settings.keep_freed_memory:
        keep_freed_memory()
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = services.streams.batcher
        await batcher.start()
        await batcher.run_in_worker(lambda: _preload(services))
        # the models, modules and imports loaded so far live as long as the process: moved out of the
        # collector's generations, a full collection no longer walks them (measured as tail latency)
        gc.collect()
        gc.freeze()
        yield
        await batcher.stop()
        services.decoder.close()
        await asyncio.to_thread(services.streams.close)  # a store flush may wait for Redis: not on the loop

    # the catalogue and the docs answer without a key unless the settings say otherwise (docs/operations.md)
    keyed_catalogue = settings.require_key_for_catalog_and_docs and bool(settings.api_keys)
    app = ServerApp(
        title="tta-server",
        version="0.1.0",
        summary="Test-time adaptation inference: per-stream adapted predictions under distribution shift.",
        lifespan=lifespan,
        **docs_routes.fastapi_docs_urls(keyed_catalogue),
    )
    app.state.services = services
    install_error_handlers(app)
    app.fast_path = FastPredict(services, error_response)
    install_metrics(app, services.metrics)
    tracing.configure(settings.tracing)
    app.add_middleware(tracing.TracingMiddleware)  # passes through while tracing is off
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, log line and span has the id
    routers = (health.router, models_routes.router, methods_routes.router, streams.router, predict.router, v2.router)
    catalogue = (models_routes.router, methods_routes.router)
    for router in routers:
        guard = [Depends(require_key)] if keyed_catalogue and router in catalogue else None
        app.include_router(router, dependencies=guard)
    if keyed_catalogue:
        app.include_router(docs_routes.guarded_docs_router(app))
    return app
