"""The Open Inference Protocol (KServe V2, as Triton speaks it) over HTTP, mapped onto streams.

Triton and KServe clients, load tools and gateways speak this protocol; here a *stream* is what
Triton's sequence batcher calls a sequence. Routes (docs/api-v2.md has examples):

- ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready`` (200, or 400 when not ready)
- ``GET /v2/models/{name}`` (metadata), ``GET /v2/models/{name}/ready`` (200 once loaded, else 400)
- ``POST /v2/models/{name}/infer``

**Infer.** The request names its stream in ``parameters.stream_id`` or in Triton's
``parameters.sequence_id`` (what ``tritonclient``'s ``infer(sequence_id=...)`` sends; an
integer is read as its decimal string). The stream must already exist (``POST /v1/streams``)
and run the model named in the URL (404 for an unknown model or stream, 400 for a stream of
another model). ``parameters.adapt`` (default true) false predicts without updating the stream.
Authentication and tenants are those of ``/v1``; every request goes through the same
``StreamService.predict`` as ``/v1/streams/{id}/predict``: queue, coalescing, adaptation step
and compare-and-set state write alike, so a batch sent here and the same batch sent to
``/v1`` leave two streams of the same seed in the same state.

One input tensor:

- ``datatype`` ``UINT8`` (raw 0..255 RGB pixels, what most clients of an image classifier
  send) or ``FP32`` in **0..1** (pixels / 255, as torchvision's ``ToTensor`` makes them; not
  mean/std-normalized: the server normalizes with the model's own mean and std). FP32 values
  are rounded to the nearest of the 256 levels (``round(x * 255)``) and then follow the UINT8
  path exactly, so ``k / 255`` in FP32 and ``k`` in UINT8 give bit-identical predictions and
  steps. Values outside [0, 1] or not finite are refused (400): they almost always mean a
  tensor that was already normalized, which would otherwise be silently clipped into garbage.
- ``shape`` ``[N, H, W, C]`` (NHWC) or ``[N, C, H, W]`` (NCHW), ``C`` 3 (RGB) or 1 (grey).
  The layout is ``parameters.layout`` of the input (or of the request) when given, else read
  from the shape: the one of dimensions 1 and 3 that is 3 while the other is not (else the one
  that is 1 while the other is not). A shape where both read alike (``[N, 3, 32, 3]``) is
  refused until ``layout`` says which. Images of another size than the model's are fitted with the model's
  resize mode, as ``/v1`` does.
- data as a JSON ``data`` list (flat or nested, row-major) or, as ``tritonclient`` sends by
  default, in the binary tensor data extension: the body is the JSON header, whose length is
  in the ``Inference-Header-Content-Length`` header, followed by the raw little-endian tensor
  (``parameters.binary_data_size``). ``Content-Encoding: gzip`` or ``deflate`` bodies are
  inflated (bounded by ``max_body_bytes``).

The declared shape is admitted (image count, pixels per image and per request:
:mod:`tta_server.serving.admission`) before any tensor is built.

Outputs: ``probabilities`` (FP32, N x C), ``labels`` (INT64, N) and ``class_names`` (BYTES, N).
All three unless ``outputs`` lists some; each output's ``parameters.binary_data`` (or the
request's ``binary_data_output``) asks for binary data in the response, and
``parameters.classification: k`` on ``probabilities`` returns Triton's classification
extension: BYTES N x k of ``"<probability>:<index>:<class name>"``, best first. The response's
``parameters`` say where the stream stands: ``stream_id``, ``step``, ``version``, ``adapted``,
``batch_images``.

Errors have the protocol's shape ``{"error": "<message>"}`` plus ``request_id``; statuses are
those of ``/v1`` except that an invalid request is 400 (the protocol has no 422).

gRPC is not served: see docs/api-v2.md.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from PIL import Image
from pydantic import ValidationError

from tta_server.api import health
from tta_server.api.body import read_body
from tta_server.api.deps import PrincipalDep, Services, ServicesDep
from tta_server.api.models_routes import model_detail
from tta_server.api.streams import stream_key
from tta_server.api.v2_schemas import (
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    ModelMetadata,
    Parameters,
    RequestInput,
    ResponseOutput,
    ServerMetadata,
    V2Error,
)
from tta_server.errors import NotFoundError, PayloadTooLargeError, RequestInvalidError, UnsupportedMediaError
from tta_server.observability.request_id import current_request_id
from tta_server.serving.admission import InputLimits, check_batch_pixels, check_count
from tta_server.serving.decode import fit_image
from tta_server.serving.stream_service import Decoder, PredictInput, PredictOutcome
from tta_server.zoo.catalogue import ModelSpec

PREFIX = "/v2"
router = APIRouter(prefix=PREFIX, tags=["v2 (Open Inference Protocol)"])

INPUT_NAME = "images"
PROBABILITIES, LABELS, CLASS_NAMES = "probabilities", "labels", "class_names"
OUTPUTS = (PROBABILITIES, LABELS, CLASS_NAMES)
DATATYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
EXTENSIONS = ["binary_tensor_data", "classification", "parameters", "sequence"]
HEADER_LENGTH = "Inference-Header-Content-Length"
Layout = Literal["NHWC", "NCHW"]

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error} for code in (400, 401, 404, 413, 415, 429, 503, 504)
}
EMPTY: dict[str, Any] = {"content": {}}
"""An OpenAPI response without a body (the protocol's health answers carry only a status)."""


def is_v2(path: str) -> bool:
    """Whether ``path`` is a V2 route, whose errors take the protocol's shape."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_answer(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """(status, body) of an error on a V2 route: ``{"error": message, "request_id": ...}``; 422 becomes 400."""
    return (400 if status == 422 else status), {"error": message, "request_id": current_request_id()}


def known_model(services: Services, name: str) -> ModelSpec:
    """The catalogue spec of ``name``; 404 when the catalogue has no such model."""
    catalogue = services.hub.catalogue
    if name not in catalogue:
        raise NotFoundError(f"unknown model '{name}'; available: {', '.join(catalogue.names())}")
    return catalogue.get(name)


# -- server and model metadata, health ------------------------------------------------------
@router.get("", response_model=ServerMetadata, summary="V2 server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="tta-server", version=request.app.version, extensions=EXTENSIONS)


@router.get(
    "/health/live",
    response_class=Response,
    responses={200: {"description": "the process answers", **EMPTY}},
    summary="V2 liveness",
)
async def live() -> Response:
    return Response(status_code=200)


@router.get(
    "/health/ready",
    response_class=Response,
    responses={200: {"description": "ready (or degraded: serving from the hot cache)", **EMPTY}, 400: EMPTY},
    summary="V2 readiness: /readyz as a status code",
)
async def ready(services: ServicesDep) -> Response:
    answer = await health.readyz(services)
    return Response(status_code=200 if answer.status_code == 200 else 400)


def metadata_of(spec: ModelSpec, services: Services) -> ModelMetadata:
    """The model's V2 metadata (loads it, as ``GET /v1/models/{name}`` does: run off the event loop)."""
    detail = model_detail(services.hub, spec)
    size, classes = spec.input_size, len(spec.classes)
    parameters: Parameters = {
        "datatypes": ",".join(DATATYPES),
        "layouts": "NHWC,NCHW",
        "fp32_range": "0..1 (pixels / 255, not normalized)",
        "input_size": size,
        "resize_mode": detail.preprocessing.resize_mode,
        "stream_parameter": "stream_id or sequence_id",
        "methods": ",".join(detail.methods),
        "loaded": detail.loaded,
    }
    if detail.weights_sha256:
        parameters["weights_sha256"] = detail.weights_sha256
    return ModelMetadata(
        name=spec.name,
        versions=[detail.weights_sha256[:12]] if detail.weights_sha256 else [],
        platform="pytorch",
        inputs=[MetadataTensor(name=INPUT_NAME, datatype="UINT8", shape=[-1, size, size, 3])],
        outputs=[
            MetadataTensor(name=PROBABILITIES, datatype="FP32", shape=[-1, classes]),
            MetadataTensor(name=LABELS, datatype="INT64", shape=[-1]),
            MetadataTensor(name=CLASS_NAMES, datatype="BYTES", shape=[-1]),
        ],
        parameters=parameters,
    )


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    responses={404: {"model": V2Error}},
    summary="V2 model metadata: input and outputs with datatype and shape",
)
async def model_metadata(name: str, services: ServicesDep) -> ModelMetadata:
    """The input is declared as UINT8 NHWC at the model's size; FP32, NCHW and other sizes are
    accepted too (``parameters`` lists them)."""
    spec = known_model(services, name)
    return await asyncio.to_thread(metadata_of, spec, services)


@router.get(
    "/models/{name}/ready",
    response_class=Response,
    responses={200: {"description": "loaded", **EMPTY}, 400: EMPTY, 404: {"model": V2Error}},
    summary="V2 model readiness: 200 once the model is in memory",
)
async def model_ready(name: str, services: ServicesDep) -> Response:
    known_model(services, name)
    return Response(status_code=200 if name in services.hub.loaded() else 400)


# -- infer: parsing -------------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedInfer:
    """An infer body split into its JSON header and the binary data after it (empty without the extension)."""

    header: InferenceRequest
    binary: memoryview


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` decompressed per ``Content-Encoding`` (gzip, deflate), never to more than ``limit`` bytes."""
    name = (encoding or "identity").strip().lower()
    if name in ("", "identity"):
        return body
    if name not in ("gzip", "deflate"):
        raise UnsupportedMediaError(f"Content-Encoding '{name}' is not accepted; send gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if name == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise RequestInvalidError(f"the body is not valid {name} data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLargeError(f"the decompressed body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise RequestInvalidError(f"the {name} body is truncated")
    return out


def parse_infer(body: bytes, header_length: str | None) -> ParsedInfer:
    """The JSON header (validated) and the binary data; 400 naming what is wrong."""
    binary = memoryview(b"")
    header = body
    if header_length is not None:
        length = int(header_length) if header_length.strip().isdigit() else -1
        if not 0 < length <= len(body):
            raise RequestInvalidError(
                f"{HEADER_LENGTH} must be between 1 and the body's {len(body)} bytes, got '{header_length[:32]}'"
            )
        header, binary = body[:length], memoryview(body)[length:]
    try:
        parsed = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestInvalidError(f"invalid inference request: {first['msg']} at {where}") from None
    return ParsedInfer(parsed, binary)


def parameter(params: Mapping[str, Any] | None, key: str, kinds: tuple[type, ...], default: Any) -> Any:
    """``params[key]`` when of one of ``kinds`` (a bool is never a number), else 400; ``default`` if absent."""
    if not params or key not in params:
        return default
    value = params[key]
    if isinstance(value, bool) and bool not in kinds:
        raise RequestInvalidError(f"parameter '{key}' must be {' or '.join(k.__name__ for k in kinds)}")
    if not isinstance(value, kinds):
        raise RequestInvalidError(f"parameter '{key}' must be {' or '.join(k.__name__ for k in kinds)}")
    return value


def stream_of(params: Mapping[str, Any] | None) -> str:
    """The stream a request names: ``stream_id``, or Triton's ``sequence_id`` (an integer as its decimal string)."""
    stream_id = parameter(params, "stream_id", (str,), None)
    sequence = parameter(params, "sequence_id", (str, int), None)
    sequence_id = str(sequence) if sequence not in (None, 0, "") else None
    if stream_id and sequence_id and stream_id != sequence_id:
        raise RequestInvalidError(f"stream_id '{stream_id}' and sequence_id '{sequence_id}' name different streams")
    chosen = stream_id or sequence_id
    if not chosen:
        raise RequestInvalidError(
            "name the stream: parameters.stream_id, or Triton's sequence_id (register it first: POST /v1/streams)"
        )
    return str(chosen)


@dataclass(frozen=True)
class Wanted:
    """One output the response carries: its name, whether binary, and the classification count (0: none)."""

    name: str
    binary: bool
    classification: int = 0


def wanted_outputs(request: InferenceRequest) -> list[Wanted]:
    """The outputs to answer (all, unless the request lists some); 400 for unknown names or options."""
    binary_default = bool(parameter(request.parameters, "binary_data_output", (bool,), False))
    if request.outputs is None:
        return [Wanted(name, binary_default) for name in OUTPUTS]
    wanted = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise RequestInvalidError(f"unknown output '{output.name}'; outputs are {', '.join(OUTPUTS)}")
        binary = bool(parameter(output.parameters, "binary_data", (bool,), binary_default))
        k = int(parameter(output.parameters, "classification", (int,), 0))
        if k < 0 or (k and output.name != PROBABILITIES):
            raise RequestInvalidError(f"classification is a positive count, offered on '{PROBABILITIES}' only")
        wanted.append(Wanted(output.name, binary, k))
    return wanted


# -- infer: the tensor ----------------------------------------------------------------------
@dataclass(frozen=True)
class TensorPlan:
    """An input tensor's admitted geometry: datatype, layout and (N, H, W, C)."""

    dtype: np.dtype[Any]
    layout: Layout
    n: int
    height: int
    width: int
    channels: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The declared shape, in the tensor's own layout."""
        if self.layout == "NHWC":
            return self.n, self.height, self.width, self.channels
        return self.n, self.channels, self.height, self.width


def layout_of(shape: list[int], given: object) -> Layout:
    """NHWC or NCHW: ``given`` when set, else the one reading of ``shape`` whose channel count is 1 or 3."""
    if given is not None:
        if given not in ("NHWC", "NCHW"):
            raise RequestInvalidError(f"parameter 'layout' must be NHWC or NCHW, got {given!r}")
        return "NHWC" if given == "NHWC" else "NCHW"
    candidates: tuple[tuple[Layout, int], ...] = (("NHWC", shape[3]), ("NCHW", shape[1]))
    for channels in (3, 1):  # RGB before grey: [N, 1, W, 3] is one RGB row, not W grey columns of 3
        readings = [layout for layout, c in candidates if c == channels]
        if len(readings) == 1:
            return readings[0]
        if readings:
            raise RequestInvalidError(f"shape {shape} reads as NHWC and as NCHW; say which with parameters.layout")
    raise RequestInvalidError(f"shape {shape} has no channel dimension of 3 or 1 (NHWC or NCHW)")


def plan_tensor(tensor: RequestInput, request_params: Mapping[str, Any] | None, limits: InputLimits) -> TensorPlan:
    """Check datatype and shape and admit the declared images (count, pixels) before any data is read."""
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise RequestInvalidError(f"datatype {tensor.datatype} is not accepted; send UINT8 (0..255) or FP32 (0..1)")
    shape = tensor.shape
    if len(shape) != 4 or any(d < 0 for d in shape):
        raise RequestInvalidError(f"shape must be [N, H, W, C] or [N, C, H, W], got {shape}")
    given = parameter(tensor.parameters, "layout", (str,), None) or parameter(request_params, "layout", (str,), None)
    layout = layout_of(shape, given)
    n, height, width, channels = shape if layout == "NHWC" else (shape[0], shape[2], shape[3], shape[1])
    if channels not in (1, 3):
        raise RequestInvalidError(f"{layout} shape {shape} has {channels} channels; send 3 (RGB) or 1 (grey)")
    check_count(n, limits)
    check_batch_pixels(n, width, height, limits)
    return TensorPlan(dtype, layout, n, height, width, channels)


def tensor_array(tensor: RequestInput, plan: TensorPlan, binary: memoryview) -> np.ndarray:
    """The tensor's values in its declared shape: from the binary data or the JSON ``data``."""
    count = int(np.prod(plan.shape))
    params = tensor.parameters or {}
    if "shared_memory_region" in params:
        raise RequestInvalidError("shared memory inputs are not supported; send the data in the request")
    size = parameter(params, "binary_data_size", (int,), None)
    if size is not None:
        if tensor.data is not None:
            raise RequestInvalidError("an input has either data or binary_data_size, not both")
        expected = count * plan.dtype.itemsize
        if size != expected or len(binary) != expected:
            raise RequestInvalidError(
                f"binary data of {len(binary)} bytes (binary_data_size {size}); the shape and datatype need {expected}"
            )
        return np.frombuffer(binary, dtype=plan.dtype).reshape(plan.shape)
    if len(binary):
        raise RequestInvalidError("binary data after the header, but the input declares no binary_data_size")
    if tensor.data is None:
        raise RequestInvalidError("the input has no data: send data or binary data (binary_data_size)")
    try:
        values = np.asarray(tensor.data)
    except (ValueError, TypeError, OverflowError):
        raise RequestInvalidError("data is not a regular (rectangular) array of numbers") from None
    if values.size != count or values.dtype.kind not in "iuf":
        raise RequestInvalidError(
            f"data holds {values.size} values of kind '{values.dtype}'; shape needs {count} numbers"
        )
    out_of_range = values.dtype.kind == "f" or (values.size and (values.min() < 0 or values.max() > 255))
    if plan.dtype == np.uint8 and out_of_range:
        raise RequestInvalidError("UINT8 data must be integers 0..255")
    return values.astype(plan.dtype).reshape(plan.shape)


def to_images(array: np.ndarray, plan: TensorPlan, spec: ModelSpec) -> np.ndarray:
    """The tensor as uint8 RGB (N, size, size, 3) for ``spec``; FP32 in [0, 1] is rounded to round(x * 255).

    Runs in the decode pool: the checks and resizes touch every value.
    """
    if plan.layout == "NCHW":
        array = array.transpose(0, 2, 3, 1)
    if plan.dtype != np.uint8:
        if not np.isfinite(array).all() or (array.size and (array.min() < 0.0 or array.max() > 1.0)):
            raise RequestInvalidError(
                "FP32 data must be finite and in [0, 1] (pixels / 255); a mean/std-normalized tensor is not accepted"
            )
        array = np.rint(array * np.float32(255.0)).astype(np.uint8)
    if plan.channels == 1:
        array = np.repeat(array, 3, axis=-1)
    size = spec.input_size
    if (plan.height, plan.width) == (size, size):
        # binary data is a read-only view of the body; torch wants memory it may own
        return np.array(array, dtype=np.uint8, order="C", copy=True if not array.flags.writeable else None)
    return np.stack([fit_image(Image.fromarray(image), size, spec.resize_mode, spec.pad_colour) for image in array])


def decoder_for(parsed: ParsedInfer, name: str, stream_id: str, services: Services) -> Decoder:
    """The ``decode`` callback of ``StreamService.predict``: checks the stream's model, admits, builds images."""

    async def decode(spec: ModelSpec) -> PredictInput:
        if spec.name != name:
            raise RequestInvalidError(
                f"stream '{stream_id}' runs model '{spec.name}', not '{name}'; send it to /v2/models/{spec.name}/infer"
            )
        inputs = parsed.header.inputs
        if len(inputs) != 1:
            raise RequestInvalidError(f"send exactly one input tensor ('{INPUT_NAME}'), got {len(inputs)}")
        plan = plan_tensor(inputs[0], parsed.header.parameters, services.limits)
        array = tensor_array(inputs[0], plan, parsed.binary)
        return PredictInput(await services.decoder.run(to_images, array, plan, spec))

    return decode


# -- infer: the answer ----------------------------------------------------------------------
def bytes_tensor(strings: list[str]) -> bytes:
    """Triton's binary BYTES serialization: each element as a 4-byte little-endian length and its UTF-8 bytes."""
    parts = []
    for text in strings:
        raw = text.encode("utf-8")
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def output_tensor(want: Wanted, probs: np.ndarray, classes: tuple[str, ...]) -> tuple[ResponseOutput, bytes | None]:
    """One output as the protocol's tensor, with its binary data when asked for binary."""
    n = len(probs)
    labels = probs.argmax(axis=1).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    values: np.ndarray | list[str]
    if want.classification:
        k = min(want.classification, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        values = [f"{probs[i, c]:f}:{c}:{classes[c]}" for i, row in enumerate(order) for c in row]
        shape, datatype = [n, k], "BYTES"
    elif want.name == PROBABILITIES:
        values, shape, datatype = probs.astype("<f4", copy=False), [n, probs.shape[1]], "FP32"
    elif want.name == LABELS:
        values, shape, datatype = labels.astype("<i8", copy=False), [n], "INT64"
    else:
        values, shape, datatype = [classes[int(c)] for c in labels], [n], "BYTES"
    if want.binary:
        blob = bytes_tensor(values) if isinstance(values, list) else values.tobytes()
        tensor = ResponseOutput(
            name=want.name, shape=shape, datatype=datatype, parameters={"binary_data_size": len(blob)}
        )
        return tensor, blob
    data = values if isinstance(values, list) else values.ravel().tolist()
    return ResponseOutput(name=want.name, shape=shape, datatype=datatype, data=data), None


def infer_response(
    name: str, request_id: str | None, wanted: list[Wanted], outcome: PredictOutcome, stream_id: str
) -> Response:
    """The inference response: JSON, or JSON header plus binary data (``Inference-Header-Content-Length``)."""
    output = outcome.output
    probs = output.probs[outcome.rows]
    tensors, blobs = [], []
    for want in wanted:
        tensor, blob = output_tensor(want, probs, output.classes)
        tensors.append(tensor)
        if blob is not None:
            blobs.append(blob)
    body = InferenceResponse(
        model_name=name,
        id=request_id,
        parameters={
            "stream_id": stream_id,
            "step": output.step,
            "version": output.version,
            "adapted": output.adapted,
            "batch_images": len(output.probs),
        },
        outputs=tensors,
    )
    header = body.model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "description": "the protocol's inference request"},
                "example": {
                    "parameters": {"stream_id": "cam-7", "adapt": True},
                    "inputs": [{"name": INPUT_NAME, "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [0, 128, 255]}],
                    "outputs": [{"name": LABELS}, {"name": PROBABILITIES, "parameters": {"classification": 3}}],
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor data extension: JSON header (Inference-Header-Content-Length bytes), "
                "then the raw tensor",
            },
        },
    }
}


@router.post(
    "/models/{name}/infer",
    responses={
        200: {
            "description": "the inference response; with binary outputs, its JSON header then the raw tensors",
            "content": {"application/json": {}, "application/octet-stream": {}},
        },
        **ERRORS,
    },
    response_class=Response,
    summary="V2 inference on a stream (parameters.stream_id or sequence_id); adapts unless parameters.adapt is false",
    openapi_extra=INFER_BODY,
)
async def infer(name: str, request: Request, services: ServicesDep, principal: PrincipalDep) -> Response:
    known_model(services, name)
    limit = services.limits.max_body_bytes
    body = inflate(await read_body(request, limit), request.headers.get("content-encoding"), limit)
    parsed = parse_infer(body, request.headers.get(HEADER_LENGTH))
    params = parsed.header.parameters
    stream_id = stream_of(params)
    adapt = bool(parameter(params, "adapt", (bool,), True))
    wanted = wanted_outputs(parsed.header)
    outcome = await services.streams.predict(
        stream_key(principal, stream_id), decoder_for(parsed, name, stream_id, services), adapt, 1
    )
    return infer_response(name, parsed.header.id, wanted, outcome, stream_id)
