"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tta_server.api.deps import ServicesDep
from tta_server.api.schemas import Health, Readiness
from tta_server.state.base import StoreUnavailableError

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: models loaded and state store reachable",
    responses={503: {"model": Readiness, "description": "not ready; `problems` says why"}},
)
def readyz(services: ServicesDep) -> JSONResponse:
    problems = list(services.startup_errors)
    store_ok = True
    try:
        services.store.ping()
    except StoreUnavailableError as exc:
        store_ok = False
        problems.append(f"state store unreachable: {exc}")
    if not services.models_ready and not services.startup_errors:
        problems.append("models are still loading")
    ready = not problems
    body = Readiness(
        status="ready" if ready else "not_ready",
        models_loaded=services.hub.loaded(),
        store=services.store.name,
        store_ok=store_ok,
        problems=problems,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
