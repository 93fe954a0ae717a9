"""Request and response bodies of the HTTP API (kept apart from internal types)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str = Field(examples=["stream 'cam-7' does not exist"])
    detail: object | None = None


class ErrorResponse(BaseModel):
    """The one shape of every error response."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
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
