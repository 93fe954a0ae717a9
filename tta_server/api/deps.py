"""Typed dependency aliases at the HTTP edge: handlers receive the process-wide services."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tta_server.api.schemas import STREAM_ID_PATTERN
from tta_server.auth import Principal, authenticate
from tta_server.errors import RequestInvalidError
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


async def get_services(request: Request) -> Services:
    """The app's services. ``async`` (like every dependency here) because FastAPI runs a plain
    ``def`` dependency in its thread pool: two thread hops per request for two dict lookups."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


# Declares the bearer scheme in the OpenAPI document. auto_error=False: a missing or malformed
# header is answered by ``authenticate`` (401 in the one error shape, with WWW-Authenticate), and
# not at all when no keys are configured.
bearer = HTTPBearer(auto_error=False, description="an API key of TTA_API_KEYS (needed only when keys are configured)")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]

X_TENANT = Header(
    description="admin keys (or no keys configured): act inside this tenant; same rules as a stream id",
    # documented, but checked in get_principal after the key, so a caller without a key gets 401 first
    json_schema_extra={"pattern": STREAM_ID_PATTERN, "maxLength": 128},
)


def check_tenant_header(x_tenant: str | None) -> None:
    """422 naming the header unless ``X-Tenant`` is absent or a valid tenant name.

    Tenants follow the stream id rules, which also keeps ``*`` (the admin marker) and
    ``/`` (the tenant/stream separator of store keys) out of tenant names.
    """
    if x_tenant is not None and not re.fullmatch(STREAM_ID_PATTERN, x_tenant):
        message = f"header X-Tenant must match {STREAM_ID_PATTERN} (letters, digits, '.', '_', '-'; at most 128)"
        raise RequestInvalidError(
            f"invalid request: {message}",
            [{"loc": ["header", "x-tenant"], "msg": message, "type": "string_pattern_mismatch"}],
        )


async def get_principal(
    services: ServicesDep,
    request: Request,
    _: BearerDep,
    x_tenant: Annotated[str | None, X_TENANT] = None,
) -> Principal:
    """The caller (401 without a valid key when keys are configured), then a checked ``X-Tenant``."""
    return resolve_principal(services.settings.api_keys, request.headers.get("authorization"), x_tenant)


def resolve_principal(api_keys: dict[str, str], authorization: str | None, x_tenant: str | None) -> Principal:
    """The caller of a request from its ``Authorization`` and ``X-Tenant`` headers (401, then 422 naming the header)."""
    principal = authenticate(api_keys, authorization, x_tenant)
    check_tenant_header(x_tenant)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_key(services: ServicesDep, request: Request, _: BearerDep) -> None:
    """Guard of the catalogue and docs routes, installed only with ``require_key_for_catalog_and_docs``:
    any configured key (of any tenant) opens them, no key is 401."""
    authenticate(services.settings.api_keys, request.headers.get("authorization"), None)
