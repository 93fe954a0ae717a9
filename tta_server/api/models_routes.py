"""``/v1/models``: what the catalogue offers, and one model's metadata."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from adapters import create_adapter, method_class, method_names
from adapters.errors import UnsupportedModelError
from adapters.norms import NormKind, detect_norm_kinds
from tta_server.api.deps import ServicesDep
from tta_server.api.schemas import ErrorResponse, MethodFit, ModelDetail, ModelInfo, ModelList, PreprocessingOut
from tta_server.errors import NotFoundError
from tta_server.models import ModelHub
from tta_server.zoo.catalogue import CatalogueError, LoadedModel, ModelSpec, read_card

router = APIRouter(prefix="/v1", tags=["models"])


def model_info(spec: ModelSpec, loaded: bool) -> ModelInfo:
    return ModelInfo(
        name=spec.name,
        arch=spec.arch,
        norm=spec.norm.value if spec.norm else None,
        origin=spec.origin,
        description=spec.description,
        classes=list(spec.classes),
        num_classes=len(spec.classes),
        input_size=spec.input_size,
        mean=list(spec.mean),
        std=list(spec.std),
        weights_sha256=spec.sha256,
        clean_top1=spec.clean_top1,
        clean_top1_data=spec.clean_top1_data,
        available=spec.weights.is_file(),
        loaded=loaded,
    )


@router.get("/models", response_model=ModelList, summary="List catalogue models")
def list_models(services: ServicesDep) -> ModelList:
    loaded = set(services.hub.loaded())
    return ModelList(models=[model_info(s, s.name in loaded) for s in services.hub.catalogue.specs()])


def preprocessing(spec: ModelSpec) -> PreprocessingOut:
    """The spec's input transform, as the decoder and the model worker apply it."""
    return PreprocessingOut(
        input_size=spec.input_size,
        mean=list(spec.mean),
        std=list(spec.std),
        resize_mode=spec.resize_mode.value,
        pad_colour=list(spec.pad_colour),
    )


def method_fits(loaded: LoadedModel | None, declared: NormKind | None) -> list[MethodFit]:
    """Every registered method checked against the model, at its default config.

    With the model loaded this is the very check stream registration runs
    (``adapter.check_model``: norm types, source statistics), so a method listed here is one a
    stream can be created with. Without it (weights missing) only the declared norm type is
    compared with each method's ``supported_norms``.
    """
    fits = []
    for name in method_names():
        reason: str | None = None
        if loaded is not None:
            try:
                create_adapter(name).check_model(loaded.model)
            except UnsupportedModelError as exc:
                reason = str(exc)
        elif declared is not None and declared not in method_class(name).supported_norms:
            supported = ", ".join(sorted(k.value for k in method_class(name).supported_norms))
            reason = f"method '{name}' adapts {supported} layers; the model declares {declared.value}"
        fits.append(MethodFit(method=name, fits=reason is None, reason=reason))
    return fits


def model_detail(hub: ModelHub, spec: ModelSpec) -> ModelDetail:
    """Load the model (once per process, through the hub) and describe it. Runs torch: call off the event loop."""
    loaded: LoadedModel | None = None
    problem: str | None = None
    try:
        loaded = hub.get(spec.name)
    except CatalogueError as exc:
        problem = str(exc)
    card: dict[str, Any] | None
    try:
        card = read_card(spec)
    except CatalogueError as exc:
        card, problem = None, problem or str(exc)
    if loaded is not None:
        norms = sorted(k.value for k in detect_norm_kinds(loaded.model))
    else:
        norms = [spec.norm.value] if spec.norm else []
    fit = method_fits(loaded, spec.norm)
    return ModelDetail(
        name=spec.name,
        arch=spec.arch,
        origin=spec.origin,
        description=spec.description,
        classes=list(spec.classes),
        num_classes=len(spec.classes),
        weights_sha256=loaded.sha256 if loaded is not None else spec.sha256,
        weights_sha256_pinned=spec.sha256,
        card=card,
        preprocessing=preprocessing(spec),
        norm=spec.norm.value if spec.norm else None,
        norms=norms,
        methods=[f.method for f in fit if f.fits],
        method_fit=fit,
        clean_top1=spec.clean_top1,
        clean_top1_data=spec.clean_top1_data,
        available=spec.weights.is_file(),
        loaded=loaded is not None,
        problem=problem,
    )


@router.get(
    "/models/{name}",
    response_model=ModelDetail,
    responses={404: {"model": ErrorResponse, "description": "no such model in the catalogue"}},
    summary="One model: weights hash, card, preprocessing, and the methods that can adapt it",
)
async def get_model(name: str, services: ServicesDep) -> ModelDetail:
    """Loads the model if it is not in memory yet, because the methods that fit are checked on the
    loaded model (the same check stream registration runs) and the hash is of the file actually
    loaded. A model whose weights cannot be loaded is still described, with ``problem`` saying why.
    """
    catalogue = services.hub.catalogue
    if name not in catalogue:
        raise NotFoundError(f"unknown model '{name}'; available: {', '.join(catalogue.names())}", {"model": name})
    return await asyncio.to_thread(model_detail, services.hub, catalogue.get(name))
