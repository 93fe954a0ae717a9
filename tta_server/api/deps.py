"""Typed dependency aliases at the HTTP edge: handlers receive the process-wide services."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request

from tta_server.auth import Principal, authenticate
from tta_server.metrics import Metrics
from tta_server.models import ModelHub
from tta_server.serving.decode import DecodePool, InputLimits
from tta_server.serving.stream_service import StreamService
from tta_server.settings import Settings


@dataclass
class StartupStatus:
    """Whether the preloaded models are in memory, and what failed while loading them."""

    models_ready: bool = False
    errors: list[str] = field(default_factory=list)


@dataclass
class Services:
    """What the app builds once at start-up and every request shares.

    Stream operations go through ``streams`` only; ``hub`` serves the model catalogue routes.
    """

    settings: Settings
    streams: StreamService
    hub: ModelHub
    metrics: Metrics
    limits: InputLimits
    decoder: DecodePool
    startup: StartupStatus = field(default_factory=StartupStatus)


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
