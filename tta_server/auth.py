"""API keys (Bearer) bound to tenants; streams are namespaced per tenant.

With no keys configured (the local default) auth is off and every caller is the admin of
tenant ``default``. A key whose tenant is ``*`` is an admin key: it lists every tenant's
streams and acts inside another tenant when the request names it in ``X-Tenant``. Another
tenant's stream is reported as absent (404), never as forbidden, so ids do not leak.
"""

from __future__ import annotations

import hmac
from typing import NamedTuple

from tta_server.errors import UnauthorizedError

ADMIN = "*"
DEFAULT_TENANT = "default"


class Principal(NamedTuple):
    """Who is calling: the tenant whose streams they address, and whether they are admin."""

    tenant: str
    admin: bool


def authenticate(api_keys: dict[str, str], authorization: str | None, x_tenant: str | None) -> Principal:
    """Resolve the caller from the ``Authorization`` header; raise 401 with a clear reason."""
    if not api_keys:
        return Principal(x_tenant or DEFAULT_TENANT, admin=True)
    if not authorization:
        raise UnauthorizedError("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise UnauthorizedError("Authorization must use the Bearer scheme: 'Bearer <api key>'")
    tenant = next((t for k, t in api_keys.items() if hmac.compare_digest(k.encode(), token.strip().encode())), None)
    if tenant is None:
        raise UnauthorizedError("unknown API key")
    if tenant == ADMIN:
        return Principal(x_tenant or DEFAULT_TENANT, admin=True)
    return Principal(tenant, admin=False)
