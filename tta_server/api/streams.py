"""``/v1/streams``: register, list, inspect, delete, reset, export/import state, drift."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status

from tta_server.api.body import read_body
from tta_server.api.deps import PrincipalDep, ServicesDep
from tta_server.api.schemas import (
    DriftOut,
    ErrorResponse,
    ResetResponse,
    StateImported,
    StreamCreate,
    StreamOut,
    StreamPage,
    WindowOut,
)
from tta_server.auth import Principal
from tta_server.serving.stream_service import NewStream, StreamView
from tta_server.state.base import StreamKey

router = APIRouter(prefix="/v1/streams", tags=["streams"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 409, 413, 415, 422, 429, 503, 504)
}


def stream_key(principal: Principal, stream_id: str) -> StreamKey:
    return StreamKey(principal.tenant, stream_id)


def stream_out(view: StreamView) -> StreamOut:
    record, summary = view.record, view.summary
    return StreamOut(
        stream_id=record.key.stream_id,
        tenant=record.key.tenant,
        model=record.model,
        method=record.method,
        config=record.config,
        seed=record.seed,
        metadata=record.metadata,
        created_at=record.created_at,
        updated_at=summary.updated_at if summary else None,
        steps=summary.steps if summary else 0,
        samples_seen=summary.samples_seen if summary else 0,
        version=summary.version if summary else 0,
        state_bytes=summary.state_bytes if summary else 0,
        model_sha256=view.model_sha256,
        drift=WindowOut(**vars(view.drift)) if view.drift else None,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=StreamOut,
    responses=ERRORS,
    summary="Register a stream",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "examples": {
                        "bn": {"value": {"model": "resnet20", "method": "bn", "stream_id": "cam-7"}},
                        "alpha_bn": {
                            "value": {"model": "resnet20", "method": "alpha_bn", "config": {"source_weight": 0.8}}
                        },
                    }
                }
            }
        }
    },
)
async def create_stream(body: StreamCreate, services: ServicesDep, principal: PrincipalDep) -> StreamOut:
    """Validate model, method and config (422 for an unknown model or method, an invalid config,
    or a norm type the method cannot adapt) and register the stream (409 if the id is taken)."""
    new = NewStream(body.model, body.method, body.config, body.seed, body.metadata, body.stream_id)
    return stream_out(await services.streams.create(principal.tenant, new))


@router.get("", response_model=StreamPage, responses=ERRORS, summary="List streams (paged)")
async def list_streams(
    services: ServicesDep,
    principal: PrincipalDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    all_tenants: Annotated[bool, Query(description="admin keys only: every tenant's streams")] = False,
) -> StreamPage:
    tenant = None if (all_tenants and principal.admin) else principal.tenant
    views, total = await services.streams.list(tenant, offset, limit)
    return StreamPage(streams=[stream_out(v) for v in views], total=total, offset=offset, limit=limit)


@router.get("/{stream_id}", response_model=StreamOut, responses=ERRORS, summary="Describe a stream")
async def get_stream(stream_id: str, services: ServicesDep, principal: PrincipalDep) -> StreamOut:
    return stream_out(await services.streams.get(stream_key(principal, stream_id)))


@router.delete("/{stream_id}", status_code=204, responses=ERRORS, summary="Delete a stream and its state")
async def delete_stream(stream_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    await services.streams.delete(stream_key(principal, stream_id))
    return Response(status_code=204)


@router.post("/{stream_id}/reset", response_model=ResetResponse, responses=ERRORS, summary="Reset to source")
async def reset_stream(stream_id: str, services: ServicesDep, principal: PrincipalDep) -> ResetResponse:
    step, version = await services.streams.reset(stream_key(principal, stream_id))
    return ResetResponse(stream_id=stream_id, step=step, version=version)


def safetensors_download(blob: bytes, filename: str, version_header: str, version: int) -> Response:
    """A safetensors attachment with its version in a header."""
    headers = {"Content-Disposition": f'attachment; filename="{filename}"', version_header: str(version)}
    return Response(blob, media_type="application/octet-stream", headers=headers)


@router.get(
    "/{stream_id}/state",
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors bytes"}, **ERRORS},
    summary="Export the stream state (safetensors)",
)
async def export_state(stream_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    blob, version = await services.streams.export_state(stream_key(principal, stream_id))
    return safetensors_download(blob, f"{stream_id}.safetensors", "X-State-Version", version)


@router.get(
    "/{stream_id}/parameters",
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors bytes"}, **ERRORS},
    summary="Adapted parameters under the model's own names, for an edge device to load",
)
async def export_parameters(stream_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    """``model.load_state_dict(tensors, strict=False)`` applies them; ``X-Parameters-Version``
    increases whenever they change, so an edge device pulls only when it is behind."""
    blob, version = await services.streams.export_parameters(stream_key(principal, stream_id))
    return safetensors_download(blob, f"{stream_id}-parameters.safetensors", "X-Parameters-Version", version)


@router.put(
    "/{stream_id}/state",
    response_model=StateImported,
    responses=ERRORS,
    summary="Import a stream state (safetensors), validated against the stream's model and method",
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}},
)
async def import_state(
    stream_id: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> StateImported:
    limit = services.settings.max_body_bytes
    step, version = await services.streams.import_state(
        stream_key(principal, stream_id), lambda: read_body(request, limit)
    )
    return StateImported(stream_id=stream_id, step=step, version=version)


@router.get("/{stream_id}/drift", response_model=DriftOut, responses=ERRORS, summary="Drift signals")
async def get_drift(stream_id: str, services: ServicesDep, principal: PrincipalDep) -> DriftOut:
    summary = await services.streams.drift_of(stream_key(principal, stream_id))
    return DriftOut(
        stream_id=stream_id,
        short=WindowOut(**vars(summary.short)),
        long=WindowOut(**vars(summary.long)),
        lifetime_images=summary.lifetime_images,
        lifetime_resets=summary.lifetime_resets,
        window_batches=summary.window_batches,
        regime=summary.regime,
    )
