"""``/v1/methods``: the registered adaptation methods and their config schemas."""

from __future__ import annotations

import inspect

from fastapi import APIRouter

from adapters import method_class, method_names
from tta_server.api.schemas import MethodInfo, MethodList

router = APIRouter(prefix="/v1", tags=["methods"])


def method_info(name: str) -> MethodInfo:
    cls = method_class(name)
    doc = inspect.getdoc(inspect.getmodule(cls)) or ""
    return MethodInfo(
        name=name,
        description=doc.split("\n\n")[0].replace("\n", " "),
        supported_norms=sorted(k.value for k in cls.supported_norms),
        predicts=cls.predicts,
        batch_size_one=cls.batch_size_one,
        config_schema=cls.config_cls.model_json_schema(),
        defaults=cls.config_cls().model_dump(mode="json"),
    )


@router.get("/methods", response_model=MethodList, summary="List adaptation methods with config schemas")
def list_methods() -> MethodList:
    return MethodList(methods=[method_info(n) for n in method_names()])
