"""Request and response bodies of the HTTP API (kept apart from internal types)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str = Field(examples=["stream 'cam-7' does not exist"])
    detail: object | None = None
    request_id: str | None = Field(None, description="the request's X-Request-ID, to find its log lines and trace")


class ErrorResponse(BaseModel):
    """The one shape of every error response."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "not_ready"]
    models_loaded: list[str]
    store: str
    store_ok: bool
    problems: list[str] = Field(default_factory=list)


class ModelInfo(BaseModel):
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
    weights_sha256: str | None = Field(description="sha256 of the weights file (pinned or computed)")
    clean_top1: float | None = Field(description="measured top-1 on clean test images, 0..1")
    clean_top1_data: str | None
    available: bool = Field(description="the weights file exists on this server")
    loaded: bool


class ModelList(BaseModel):
    models: list[ModelInfo]


STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class StreamCreate(BaseModel):
    """Register a stream: which model, which method, the method's config."""

    model_config = {"extra": "forbid"}

    model: str = Field(examples=["resnet20"], description="catalogue model name (GET /v1/models)")
    method: str = Field(examples=["bn"], description="adaptation method (GET /v1/methods)")
    config: dict[str, object] = Field(default_factory=dict, description="method config; defaults fill the rest")
    stream_id: str | None = Field(
        None, pattern=STREAM_ID_PATTERN, examples=["cam-7"], description="generated if absent"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds the method's random initialization")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32, description="free labels, kept as given")


class WindowOut(BaseModel):
    batches: int
    images: int
    entropy_mean: float | None
    confidence_mean: float | None
    class_distribution: list[float]
    class_shift_tv: float | None = Field(description="total variation distance of predicted classes from uniform")
    filtered_ratio: float | None
    source_disagreement: float | None
    bn_shift: float | None
    resets: int


class DriftOut(BaseModel):
    stream_id: str
    short: WindowOut
    long: WindowOut
    lifetime_images: int
    lifetime_resets: int
    window_batches: dict[str, int]
    regime: str | None = Field(None, description="`auto` streams: the regime of the latest batch")


class StreamOut(BaseModel):
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
    state_bytes: int = Field(
        description="size of the stored state: tensor bytes in the memory store, the serialized blob in Redis"
    )
    model_sha256: str | None = Field(
        None, description="sha256 of the weights this server runs the stream's model with (None before it is loaded)"
    )
    drift: WindowOut | None = None


class StreamPage(BaseModel):
    streams: list[StreamOut]
    total: int
    offset: int
    limit: int


class TopK(BaseModel):
    label: int
    class_name: str
    probability: float


class Prediction(BaseModel):
    label: int = Field(description="predicted class index")
    class_name: str
    probability: float
    entropy: float = Field(description="prediction entropy in nats")
    top_k: list[TopK]


class PredictResponse(BaseModel):
    stream_id: str
    model: str
    method: str
    step: int = Field(description="the stream's step after this request")
    version: int = Field(description="the stored state's version after this request")
    adapted: bool = Field(description="whether this batch updated the stream")
    batch_images: int = Field(description="images in the adaptation batch this request was part of")
    predictions: list[Prediction]
    regime: str | None = Field(None, description="`auto` streams: the regime this batch was predicted in")


class PredictJSON(BaseModel):
    """JSON body of /predict: base64-encoded PNG, JPEG or WebP images."""

    model_config = {"extra": "forbid"}

    images: list[str] = Field(min_length=1, description="base64 of encoded images")
    adapt: bool | None = None
    top_k: int | None = Field(None, ge=1, le=1000)


class ResetResponse(BaseModel):
    stream_id: str
    step: int
    version: int


class StateImported(BaseModel):
    stream_id: str
    step: int
    version: int


class MethodInfo(BaseModel):
    name: str
    description: str
    supported_norms: list[str]
    predicts: str
    batch_size_one: str
    config_schema: dict[str, object]
    defaults: dict[str, object]


class MethodList(BaseModel):
    methods: list[MethodInfo]


class PreprocessingOut(BaseModel):
    """What happens to an image between the request body and the model (docs/models.md)."""

    input_size: int = Field(description="the model's square input side, in pixels")
    mean: list[float] = Field(description="per-channel mean subtracted from RGB in [0, 1]")
    std: list[float] = Field(description="per-channel std the centred values are divided by")
    resize_mode: Literal["squash", "resize_crop", "letterbox"] = Field(
        description="how images of another size are fitted; images at input_size are never resampled"
    )
    pad_colour: list[int] = Field(description="uint8 RGB of letterbox padding (the mean colour)")
    exif_orientation: bool = Field(True, description="images are turned upright by their EXIF tag first")
    resample: Literal["bilinear"] = "bilinear"


class MethodFit(BaseModel):
    """Whether one registered method can adapt this model at its default config."""

    method: str
    fits: bool
    reason: str | None = Field(None, description="why it does not fit (the 422 a stream registration would get)")


class ModelDetail(BaseModel):
    """One catalogue model: identity, weights hash, card, preprocessing and the methods that fit it."""

    name: str
    arch: str
    origin: str
    description: str
    classes: list[str]
    num_classes: int
    weights_sha256: str | None = Field(
        description="sha256 of the weights file this server loaded (the pinned hash when it cannot be loaded)"
    )
    weights_sha256_pinned: str | None = Field(description="the hash the catalogue pins, if any")
    card: dict[str, object] | None = Field(description="the model card, when the catalogue has one")
    preprocessing: PreprocessingOut
    norm: str | None = Field(description="declared norm type")
    norms: list[str] = Field(description="norm layer types found in the loaded model (declared ones if not loaded)")
    methods: list[str] = Field(description="registered methods that can adapt this model")
    method_fit: list[MethodFit] = Field(description="every registered method, with the reason when it does not fit")
    clean_top1: float | None
    clean_top1_data: str | None
    available: bool = Field(description="the weights file exists on this server")
    loaded: bool = Field(description="the model is in memory (after this request, when it could be loaded)")
    problem: str | None = Field(None, description="why the model could not be loaded, if it could not")
