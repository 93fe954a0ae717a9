"""Typed dependency aliases at the HTTP edge: handlers receive the process-wide services."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request

from tta_server.auth import Principal, authenticate
from tta_server.metrics import Metrics
from tta_server.models import ModelHub
from tta_server.serving.batcher import Batcher
from tta_server.serving.decode import InputLimits
from tta_server.serving.drift import DriftTracker
from tta_server.serving.runner import BatchOutput, StreamRunner
from tta_server.settings import Settings
from tta_server.state.base import StateStore


@dataclass
class Services:
    """What the app builds once at start-up and every request shares."""

    settings: Settings
    hub: ModelHub
    store: StateStore
    metrics: Metrics
    drift: DriftTracker
    runner: StreamRunner
    batcher: Batcher[BatchOutput]
    limits: InputLimits
    startup_errors: list[str] = field(default_factory=list)
    models_ready: bool = False


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_principal(
    services: ServicesDep,
    authorization: Annotated[str | None, Header(description="Bearer <api key>")] = None,
    x_tenant: Annotated[str | None, Header(description="admin keys only: act inside this tenant")] = None,
) -> Principal:
    return authenticate(services.settings.api_keys, authorization, x_tenant)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
