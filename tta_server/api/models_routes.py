"""``/v1/models``: what the catalogue offers."""

from __future__ import annotations

from fastapi import APIRouter

from tta_server.api.deps import ServicesDep
from tta_server.api.schemas import ModelInfo, ModelList
from tta_server.zoo.catalogue import ModelSpec

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
