"""Every endpoint as data: what to send and how to read the answer.

The sync and the async client differ only in how they send and how they sleep; keeping
each endpoint's request and parsing here, once, means the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from tta_client.images import Encoding, Images, encode_images
from tta_client.types import (
    Drift,
    Health,
    MethodInfo,
    MethodList,
    ModelInfo,
    ModelList,
    ParametersExport,
    PredictResult,
    Readiness,
    ResetResult,
    StateExport,
    StateImported,
    Stream,
    StreamPage,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

Files = list[tuple[str, tuple[str, bytes, str]]]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP exchange: the request parts, the statuses that are answers, and the parser.

    ``accept`` lists non-2xx statuses that still carry a normal answer (``/readyz`` says
    503 with a report). ``retry`` False opts out of the client's retry policy.
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    files: Files | None = None
    headers: dict[str, str] = field(default_factory=dict)
    accept: frozenset[int] = frozenset()
    retry: bool = True
    timeout: float | None = None

    def build(self, http: httpx.Client | httpx.AsyncClient, headers: dict[str, str]) -> httpx.Request:
        """The request, with the client's auth headers under this call's own."""
        return http.build_request(
            self.method,
            self.path,
            params=self.params,
            json=self.json,
            content=self.content,
            files=self.files,
            headers={**headers, **self.headers},
            timeout=self.timeout if self.timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )


def _stream_path(stream_id: str, suffix: str = "") -> str:
    """Quote the id so that a malformed one is refused by the server, not routed elsewhere."""
    return f"/v1/streams/{quote(stream_id, safe='')}{suffix}"


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        return cls.model_validate_json(response.content)

    return parse


def _none(_: httpx.Response) -> None:
    return None


def health() -> Call[Health]:
    return Call("GET", "/healthz", _model(Health), retry=False)


def ready() -> Call[Readiness]:
    return Call("GET", "/readyz", _model(Readiness), accept=frozenset({503}), retry=False)


def metrics() -> Call[str]:
    return Call("GET", "/metrics", lambda r: r.text)


def models() -> Call[list[ModelInfo]]:
    return Call("GET", "/v1/models", lambda r: ModelList.model_validate_json(r.content).models)


def methods() -> Call[list[MethodInfo]]:
    return Call("GET", "/v1/methods", lambda r: MethodList.model_validate_json(r.content).methods)


def create_stream(
    model: str,
    method: str,
    config: dict[str, Any] | None,
    stream_id: str | None,
    seed: int,
    metadata: dict[str, str] | None,
) -> Call[Stream]:
    body: dict[str, Any] = {"model": model, "method": method, "config": config or {}, "seed": seed}
    if stream_id is not None:
        body["stream_id"] = stream_id
    if metadata:
        body["metadata"] = metadata
    return Call("POST", "/v1/streams", _model(Stream), json=body)


def list_streams(offset: int, limit: int, all_tenants: bool) -> Call[StreamPage]:
    params: dict[str, Any] = {"offset": offset, "limit": limit}
    if all_tenants:
        params["all_tenants"] = "true"
    return Call("GET", "/v1/streams", _model(StreamPage), params=params)


def get_stream(stream_id: str) -> Call[Stream]:
    return Call("GET", _stream_path(stream_id), _model(Stream))


def delete_stream(stream_id: str) -> Call[None]:
    return Call("DELETE", _stream_path(stream_id), _none)


def reset_stream(stream_id: str) -> Call[ResetResult]:
    return Call("POST", _stream_path(stream_id, "/reset"), _model(ResetResult))


def predict(
    stream_id: str, images: Images, adapt: bool, top_k: int, encoding: Encoding, timeout: float | None
) -> Call[PredictResult]:
    body = encode_images(images, encoding)
    return Call(
        "POST",
        _stream_path(stream_id, "/predict"),
        _model(PredictResult),
        params={"adapt": "true" if adapt else "false", "top_k": top_k},
        json=body.json,
        content=body.content,
        files=body.files,
        headers=body.headers or {},
        timeout=timeout,
    )


def export_state(stream_id: str) -> Call[StateExport]:
    def parse(response: httpx.Response) -> StateExport:
        version = int(response.headers.get("x-state-version", "0"))
        return StateExport(stream_id=stream_id, data=response.content, version=version)

    return Call("GET", _stream_path(stream_id, "/state"), parse)


def parameters(stream_id: str) -> Call[ParametersExport]:
    def parse(response: httpx.Response) -> ParametersExport:
        version = int(response.headers.get("x-parameters-version", "0"))
        return ParametersExport(stream_id=stream_id, data=response.content, version=version)

    return Call("GET", _stream_path(stream_id, "/parameters"), parse)


def import_state(stream_id: str, data: bytes) -> Call[StateImported]:
    return Call(
        "PUT",
        _stream_path(stream_id, "/state"),
        _model(StateImported),
        content=data,
        headers={"content-type": "application/octet-stream"},
    )


def drift(stream_id: str) -> Call[Drift]:
    return Call("GET", _stream_path(stream_id, "/drift"), _model(Drift))
