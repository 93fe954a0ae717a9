"""The FastAPI application factory.

``create_app(settings)`` builds the process-wide services once (catalogue, model hub, state
store), loads the preloaded models in a worker thread during start-up so the event loop
never runs torch, and maps every :class:`~tta_server.errors.ServiceError` to the one JSON
error shape in one place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tta_server.api import health, models_routes
from tta_server.api.deps import Services
from tta_server.errors import ServiceError
from tta_server.models import ModelHub
from tta_server.settings import Settings
from tta_server.state.factory import open_store

log = logging.getLogger(__name__)


def _preload(services: Services) -> None:
    for name in services.settings.preload_models:
        try:
            services.hub.get(name)
        except Exception as exc:
            log.error("cannot load model %s: %s", name, exc)
            services.startup_errors.append(f"model '{name}' failed to load: {exc}")
    services.models_ready = True


def _error(status: int, code: str, message: str, detail: object = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "detail": detail}}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Map service errors, validation errors and HTTP errors to the one error shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.to_body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        fields = "; ".join(".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in errors)
        return _error(422, "validation_error", f"invalid request: {fields}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))


def create_app(settings: Settings) -> FastAPI:
    """Build the ASGI app for ``settings`` (nothing is built at import time)."""
    services = Services(settings=settings, hub=ModelHub.from_settings(settings), store=open_store(settings.store_url))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(_preload, services)
        yield
        services.store.close()

    app = FastAPI(
        title="tta-server",
        version="0.1.0",
        summary="Test-time adaptation inference: per-stream adapted predictions under distribution shift.",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models_routes.router)
    return app
