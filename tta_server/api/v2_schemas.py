"""Bodies of the Open Inference Protocol (KServe V2) REST routes, as the protocol names their fields.

Kept apart from :mod:`tta_server.api.schemas` because they follow an external specification,
field for field, rather than this server's own API. Parameters are the protocol's
``$parameters``: a JSON object of booleans, numbers and strings.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Parameters = dict[str, bool | int | float | str]


class V2Error(BaseModel):
    """The protocol's error shape; ``request_id`` is this server's addition (the X-Request-ID)."""

    error: str = Field(examples=["stream 'cam-7' does not exist"])
    request_id: str | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str = Field(examples=["UINT8"])
    shape: list[int] = Field(description="-1 for a dimension of any size (the batch)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the first 12 hex digits of the weights' sha256, when known")
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: Parameters = Field(
        default_factory=dict,
        description="this server's addition: accepted datatypes and layouts, preprocessing, weights hash, methods",
    )


class RequestInput(BaseModel):
    """One input tensor: its data as a JSON list (flat or nested, row-major) or as binary data after the header."""

    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    """The JSON header of an infer request (the whole body without the binary data extension)."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]
