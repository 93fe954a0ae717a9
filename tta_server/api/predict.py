"""``POST /v1/streams/{id}/predict``: decode, queue, adapt, answer."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError
from pydantic_core import to_json
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from adapters.auto import regime_name
from tta_server.api.body import read_body
from tta_server.api.deps import PrincipalDep, Services, ServicesDep
from tta_server.api.schemas import PredictJSON, PredictResponse
from tta_server.api.streams import ERRORS, stream_key
from tta_server.errors import PayloadTooLargeError, RequestInvalidError, UnsupportedMediaError
from tta_server.serving.admission import InputLimits, admit_files, admit_npy
from tta_server.serving.decode import decode_files, decode_npy_batch
from tta_server.serving.model_worker import BatchOutput
from tta_server.serving.stream_service import PredictInput, PredictOutcome
from tta_server.zoo.catalogue import ModelSpec

router = APIRouter(prefix="/v1/streams", tags=["predict"])

NPY_TYPES = ("application/x-npy", "application/octet-stream", "application/npy")
INLINE_NPY_BYTES = 1 << 20
"""A ``.npy`` body up to this size that needs no resampling is copied on the event loop (tens of
microseconds at most) instead of in the decode pool, whose thread hop costs more than the copy."""

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "application/json": {"schema": PredictJSON.model_json_schema()},
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def content_type_of(request: Request) -> str:
    """The media type of the body, refused with 415 before anything is read when it is not accepted."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/json", *NPY_TYPES):
        return content_type
    raise UnsupportedMediaError(
        f"content type '{content_type or 'none'}' is not accepted; send multipart/form-data (PNG, JPEG, WebP files), "
        "application/json (base64 images) or application/x-npy (uint8 N x H x W x 3)"
    )


async def multipart_files(request: Request, limits: InputLimits) -> list[bytes]:
    """The uploaded files' bytes; more files than allowed is 413, a malformed body 422."""
    try:
        form = await request.form(max_files=limits.max_images, max_fields=16)
    except (MultiPartException, StarletteHTTPException) as exc:  # Starlette wraps parser errors in a 400
        message = exc.message if isinstance(exc, MultiPartException) else str(exc.detail)
        if "Too many files" in message:
            raise PayloadTooLargeError(
                f"more than {limits.max_images} files in one request", {"max_images": limits.max_images}
            ) from None
        raise RequestInvalidError(f"malformed multipart body: {message}") from None
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    return [await f.read() for f in files]


def json_images(body: bytes) -> tuple[list[bytes], PredictJSON]:
    """The base64 images and options of a JSON body (422 naming the field when invalid)."""
    try:
        options = PredictJSON.model_validate_json(body)
    except ValidationError as exc:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        raise RequestInvalidError(f"invalid JSON body: {errors[0]['msg']} at {errors[0]['loc']}", errors) from None
    blobs = []
    for i, text in enumerate(options.images):
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise RequestInvalidError(f"image {i} is not valid base64", {"index": i}) from None
    return blobs, options


async def decode_request(request: Request, spec: ModelSpec, services: Services) -> PredictInput:
    """The request's images as (N, size, size, 3) uint8 for the model of ``spec``, and the body's options.

    The body is admitted from its headers (count, formats, pixel budget) before any pixel is
    decoded; decoding then runs in the bounded decode pool.
    """
    limits, decoder = services.limits, services.decoder
    fit = {"resize_mode": spec.resize_mode, "fill": spec.pad_colour}
    content_type = content_type_of(request)
    body = await read_body(request, limits.max_body_bytes)
    if content_type in NPY_TYPES:
        return await decode_npy_request(body, spec, services)
    options: PredictJSON | None = None
    if content_type == "multipart/form-data":
        blobs = await multipart_files(request, limits)
    else:
        blobs, options = json_images(body)
    admitted = admit_files(blobs, limits)
    images = await decoder.run(decode_files, admitted, spec.input_size, **fit)
    if options is None:
        return PredictInput(images)
    return PredictInput(images, options.adapt, options.top_k)


async def decode_npy_request(body: bytes, spec: ModelSpec, services: Services) -> PredictInput:
    """A ``.npy`` body admitted from its header, then decoded (inline when it is already at the model's size)."""
    admitted = admit_npy(body, services.limits)
    if admitted.shape[1:3] == (spec.input_size, spec.input_size) and len(body) <= INLINE_NPY_BYTES:
        # already at the model's size: "decoding" is one small copy, cheaper than the hop to the pool
        return PredictInput(decode_npy_batch(admitted, spec.input_size))
    fit = {"resize_mode": spec.resize_mode, "fill": spec.pad_colour}
    return PredictInput(await services.decoder.run(decode_npy_batch, admitted, spec.input_size, **fit))


def predictions(output: BatchOutput, rows: slice, top_k: int) -> list[dict[str, Any]]:
    """The answer's rows (the fields of :class:`Prediction`): top-k classes, probabilities and entropy per image.

    The numbers are gathered for the whole batch in numpy and turned into Python values with one
    ``tolist()`` each, and the rows are plain dicts in the schema's field order: a per-value
    ``float()`` and a pydantic model per class (even built without validation) cost more CPU than
    the rest of the answer. ``tests/api`` checks the JSON against the validated schema.
    """
    probs, entropy = output.probs[rows], output.scored.entropy[rows]
    k = min(top_k, probs.shape[1])
    order = (-probs).argsort(axis=1, kind="stable")[:, :k]  # the method: np.argsort adds a Python wrapper
    labels: list[list[int]] = order.tolist()
    chances: list[list[float]] = probs[
        np.arange(len(probs))[:, None], order
    ].tolist()  # take_along_axis, minus its checks
    classes = output.classes
    out = []
    for row_labels, row_probs, row_entropy in zip(labels, chances, entropy.tolist(), strict=True):
        top = [
            {"label": c, "class_name": classes[c], "probability": p} for c, p in zip(row_labels, row_probs, strict=True)
        ]
        first = top[0]
        out.append({**first, "entropy": row_entropy, "top_k": top})
    return out


@router.post(
    "/{stream_id}/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    summary="Adapted predictions for a batch of images",
    openapi_extra=PREDICT_BODY,
)
async def predict(
    stream_id: str,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    adapt: Annotated[bool, Query(description="false: predict without updating the stream")] = True,
    top_k: Annotated[int, Query(ge=1, le=1000, description="classes listed per image")] = 5,
) -> Response:
    """Images as multipart files (PNG, JPEG, WebP), JSON base64 or one .npy uint8 batch.

    Images are converted to RGB and resized to the model's input size. Requests of one stream
    are served in arrival order; concurrent requests of the same stream may share one
    adaptation batch (``batch_images``).
    """
    outcome = await services.streams.predict(
        stream_key(principal, stream_id),
        lambda spec: decode_request(request, spec, services),
        adapt,
        top_k,
    )
    return Response(answer_json(stream_id, outcome), media_type="application/json")


def answer_json(stream_id: str, outcome: PredictOutcome) -> bytes:
    """The predict answer's JSON (:class:`PredictResponse`): every field typed by construction (see
    :func:`predictions`), serialized once by pydantic's serializer (FastAPI would validate it again)."""
    output, record = outcome.output, outcome.record
    body = {
        "stream_id": stream_id,
        "model": record.model,
        "method": record.method,
        "step": output.step,
        "version": output.version,
        "adapted": output.adapted,
        "batch_images": len(output.probs),
        "predictions": predictions(output, outcome.rows, outcome.top_k),
        "regime": regime_name(output.info.extra.get("regime")),
    }
    return to_json(body)
