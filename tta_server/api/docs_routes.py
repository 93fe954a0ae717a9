"""``/openapi.json``, ``/docs`` and ``/redoc`` behind an API key.

FastAPI serves its documentation routes without any dependency, so with
``require_key_for_catalog_and_docs`` the app turns them off and serves the same pages from
this router, which carries the key guard. A browser cannot add an ``Authorization`` header to
a page it navigates to: keyed docs are for tools, or for a proxy that adds the header.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from tta_server.api.deps import require_key

OPENAPI_URL, DOCS_URL, REDOC_URL = "/openapi.json", "/docs", "/redoc"


def fastapi_docs_urls(guarded: bool) -> dict[str, Any]:
    """FastAPI's own documentation routes (open to anyone), or none when :func:`guarded_docs_router` replaces them."""
    if guarded:
        return {"openapi_url": None, "docs_url": None, "redoc_url": None}
    return {"openapi_url": OPENAPI_URL, "docs_url": DOCS_URL, "redoc_url": REDOC_URL}


def guarded_docs_router(app: FastAPI) -> APIRouter:
    """The same three documents as FastAPI's, each needing a key (401 with ``WWW-Authenticate`` otherwise)."""
    router = APIRouter(dependencies=[Depends(require_key)], include_in_schema=False)

    @router.get(OPENAPI_URL)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get(DOCS_URL)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{app.title} - Swagger UI")

    @router.get(REDOC_URL)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=OPENAPI_URL, title=f"{app.title} - ReDoc")

    return router
