"""Typed dependency aliases at the HTTP edge: handlers receive the process-wide services."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from tta_server.models import ModelHub
from tta_server.settings import Settings
from tta_server.state.base import StateStore


@dataclass
class Services:
    """What the app builds once at start-up and every request shares."""

    settings: Settings
    hub: ModelHub
    store: StateStore
    startup_errors: list[str] = field(default_factory=list)
    models_ready: bool = False


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
