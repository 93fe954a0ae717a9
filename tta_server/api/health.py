"""Liveness and readiness probes.

Readiness has three answers. ``ready`` (200); ``not_ready`` (503: models not loaded, or a
store without a hot cache cannot be reached); ``degraded`` (200): the Redis store cannot be
reached, or is still catching up after an outage, but this replica keeps serving the streams
in its hot cache. A degraded replica stays in the load balancer on purpose: taking every
replica out when the shared Redis fails would stop all predictions, while the cached streams
can still be served. ``store_ok`` is false while degraded, and ``problems`` names the store,
so a probe that prefers draining can key on either.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tta_server.api.deps import ServicesDep
from tta_server.api.schemas import Health, Readiness
from tta_server.state.base import StoreUnavailableError

router = APIRouter(tags=["health"])


@runtime_checkable
class DegradableStore(Protocol):
    """A store that keeps serving from a hot cache when its backend fails (the Redis store)."""

    def degradation(self) -> str | None:
        """Why the store is degraded, or None when it is healthy."""


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    """Answered on the event loop itself, touching nothing else: it stays fast while Redis hangs."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: models loaded and state store reachable (or degraded: serving from the hot cache)",
    responses={503: {"model": Readiness, "description": "not ready; `problems` says why"}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    store = services.streams.store
    problems = list(services.startup.errors)
    degraded: list[str] = []
    store_ok = True
    try:
        await services.streams.check_store()
    except StoreUnavailableError as exc:
        store_ok = False
        if isinstance(store, DegradableStore):
            degraded.append(f"state store {store.name} degraded: {store.degradation() or exc}")
        else:
            problems.append(f"state store {store.name} unreachable: {exc}")
    if store_ok and isinstance(store, DegradableStore):
        reason = store.degradation()
        if reason:
            degraded.append(f"state store {store.name} degraded: {reason}")
    if not services.startup.models_ready and not services.startup.errors:
        problems.append("models are still loading")
    status = "not_ready" if problems else "degraded" if degraded else "ready"
    body = Readiness(
        status=status,
        models_loaded=services.hub.loaded(),
        store=store.name,
        store_ok=store_ok,
        problems=problems + degraded,
    )
    return JSONResponse(body.model_dump(), status_code=503 if problems else 200)
