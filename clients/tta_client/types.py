"""Typed responses: pydantic models mirroring the server's response schemas.

Field names and types follow ``tta_server/api/schemas.py`` (a test compares the two), but
unknown fields are ignored rather than rejected, so a client keeps working against a newer
server that adds fields. The client never imports the server package: it must install
without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Response(BaseModel):
    """Base of every response model: tolerant of fields added by newer servers."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Health(Response):
    status: Literal["ok"] = "ok"


class Readiness(Response):
    """``GET /readyz``: returned for both 200 and 503, since a not-ready answer is a report, not a failure.

    ``status`` is ``ready``, ``degraded`` (200: the state store is unreachable but streams in
    the hot cache are served) or ``not_ready`` (503); kept a plain string so that a status a
    newer server adds does not break this client.
    """

    status: str
    models_loaded: list[str]
    store: str
    store_ok: bool
    problems: list[str] = Field(default_factory=list)

    @property
    def ready(self) -> bool:
        """True when the server serves predictions (``ready`` or ``degraded``)."""
        return self.status in ("ready", "degraded")

    @property
    def degraded(self) -> bool:
        return self.status == "degraded"


class ModelInfo(Response):
    """One catalogue entry (``GET /v1/models``)."""

    name: str
    arch: str
    norm: str | None
    origin: str
    description: str
    classes: list[str]
    num_classes: int
    input_size: int
    mean: list[float]
    std: list[float]
    weights_sha256: str | None
    clean_top1: float | None
    clean_top1_data: str | None
    available: bool
    loaded: bool


class ModelList(Response):
    models: list[ModelInfo]


class MethodInfo(Response):
    """One adaptation method with its config JSON schema and defaults (``GET /v1/methods``)."""

    name: str
    description: str
    supported_norms: list[str]
    predicts: str
    batch_size_one: str
    config_schema: dict[str, object]
    defaults: dict[str, object]


class MethodList(Response):
    methods: list[MethodInfo]


class Window(Response):
    """Drift signals aggregated over a window of recent batches."""

    batches: int
    images: int
    entropy_mean: float | None
    confidence_mean: float | None
    class_distribution: list[float]
    class_shift_tv: float | None
    filtered_ratio: float | None
    source_disagreement: float | None
    bn_shift: float | None
    resets: int


class Drift(Response):
    """``GET /v1/streams/{id}/drift``: short and long windows plus lifetime counts."""

    stream_id: str
    short: Window
    long: Window
    lifetime_images: int
    lifetime_resets: int
    window_batches: dict[str, int]
    regime: str | None = None
    """``auto`` streams: the regime of the latest batch."""


class Stream(Response):
    """A registered stream and its adaptation progress."""

    stream_id: str
    tenant: str
    model: str
    method: str
    config: dict[str, object]
    seed: int
    metadata: dict[str, str]
    created_at: float
    updated_at: float | None
    steps: int
    samples_seen: int
    version: int
    state_bytes: int
    model_sha256: str | None = None
    drift: Window | None = None


class StreamPage(Response):
    """One page of ``GET /v1/streams``."""

    streams: list[Stream]
    total: int
    offset: int
    limit: int


class TopK(Response):
    label: int
    class_name: str
    probability: float


class Prediction(Response):
    """One image's answer: top class, its probability, the entropy (nats) and the top-k list."""

    label: int
    class_name: str
    probability: float
    entropy: float
    top_k: list[TopK]


class PredictResult(Response):
    """``POST /v1/streams/{id}/predict``: one prediction per image, in request order."""

    stream_id: str
    model: str
    method: str
    step: int
    version: int
    adapted: bool
    batch_images: int
    predictions: list[Prediction]
    regime: str | None = None
    """``auto`` streams: the regime this batch was predicted in (source, batch_mix, components)."""

    @property
    def labels(self) -> list[int]:
        return [p.label for p in self.predictions]


class ResetResult(Response):
    stream_id: str
    step: int
    version: int


class StateImported(Response):
    stream_id: str
    step: int
    version: int


@dataclass(frozen=True)
class StateExport:
    """``GET /v1/streams/{id}/state``: safetensors bytes and the state version they capture.

    Keep the bytes as they are: ``PUT /state`` checks them against the stream's method,
    config and model weights hash, so a backup only restores onto a matching stream.
    """

    stream_id: str
    data: bytes
    version: int


@dataclass(frozen=True)
class ParametersExport:
    """``GET /v1/streams/{id}/parameters``: the adapted parameters under the model's own names.

    ``data`` is a safetensors file for an edge device running the same model:
    ``model.load_state_dict(safetensors.torch.load(data), strict=False)`` applies it.
    ``version`` is the stream state version they were taken from (``X-Parameters-Version``),
    so a device can tell whether it already has them.
    """

    stream_id: str
    data: bytes
    version: int
