"""Admission: what a predict body will cost, read from its headers before any pixel is decoded.

Why: decoding is where a hostile body costs CPU. Two 264 KB requests of 128 one-bit
4096 x 4096 PNGs each once cost 31.5 s of server CPU, because every limit was checked per image
while decoding. Here a body is *admitted* first: each PNG/JPEG/WebP header (Pillow reads only the
header when an image is opened) and the ``.npy`` header give the format, the image count and every
image's pixel count, and the request's whole budget (images, pixels per image, pixels per
request) is checked against them. Only an admitted body is decoded, in a bounded pool.

The ``.npy`` header is parsed here too, strictly (dtype, order, shape), instead of by
``np.load``: an array whose header declares a huge shape is refused before numpy allocates
anything, empty images are refused, and no two threads run ``np.load``'s parser at once.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from tta_server.errors import PayloadTooLargeError, RequestInvalidError, UnsupportedMediaError

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

NPY_MAGIC = b"\x93NUMPY"
NPY_UINT8 = ("|u1", "<u1", ">u1", "u1")
_NPY_HEADER = re.compile(
    r"""^\{\s*'descr':\s*'(?P<descr>[^']*)',\s*'fortran_order':\s*(?P<fortran>True|False),\s*"""
    r"""'shape':\s*\(\s*(?P<shape>(?:[0-9]+\s*,\s*)*[0-9]*)\s*\),?\s*\}\s*$"""
)
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class InputLimits:
    """Bounds on one request; from the settings."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_images: int = 256
    max_pixels: int = 4096 * 4096
    """Pixels of one image (the decompression-bomb guard)."""
    max_request_pixels: int = 4096 * 4096
    """Pixels of all images of one request together (the decode budget)."""


@dataclass(frozen=True)
class AdmittedFiles:
    """Encoded images whose headers passed the limits: their bytes and (width, height) each."""

    blobs: list[bytes]
    sizes: list[tuple[int, int]]

    @property
    def count(self) -> int:
        return len(self.blobs)


class AdmittedNpy(NamedTuple):
    """A ``.npy`` uint8 batch whose header passed the limits: shape (N, H, W, C) and where the data starts."""

    body: bytes
    shape: tuple[int, int, int, int]
    offset: int
    fortran_order: bool


def check_count(n: int, limits: InputLimits) -> None:
    """At least one image and at most ``max_images`` (413 above)."""
    if n == 0:
        raise RequestInvalidError("the request holds no images")
    if n > limits.max_images:
        raise PayloadTooLargeError(
            f"{n} images in one request exceeds the limit of {limits.max_images}",
            {"images": n, "max_images": limits.max_images},
        )


def check_pixels(sizes: list[tuple[int, int]], limits: InputLimits) -> None:
    """Each image within ``max_pixels``, none empty, and all of them within ``max_request_pixels``."""
    for i, (width, height) in enumerate(sizes):
        check_image_pixels(i, width, height, limits)
    check_request_pixels(len(sizes), sum(width * height for width, height in sizes), limits)


def check_batch_pixels(n: int, width: int, height: int, limits: InputLimits) -> None:
    """:func:`check_pixels` for ``n`` images of one size (a tensor batch): one image checked, not ``n``."""
    check_image_pixels(0, width, height, limits)  # every image of the batch has this size
    check_request_pixels(n, n * width * height, limits)


def check_image_pixels(index: int, width: int, height: int, limits: InputLimits) -> None:
    """One image is not empty and within ``max_pixels``."""
    if width <= 0 or height <= 0:
        raise RequestInvalidError(f"image {index} is empty ({width}x{height} pixels)", {"index": index})
    if width * height > limits.max_pixels:
        raise PayloadTooLargeError(
            f"image {index}: {width}x{height} pixels exceeds the limit of {limits.max_pixels} per image",
            {"index": index, "width": width, "height": height, "max_pixels": limits.max_pixels},
        )


def check_request_pixels(count: int, total: int, limits: InputLimits) -> None:
    """The request's ``count`` images hold at most ``max_request_pixels`` together."""
    if total > limits.max_request_pixels:
        raise PayloadTooLargeError(
            f"the request's {count} images hold {total} pixels, over the limit of "
            f"{limits.max_request_pixels} per request; send fewer or smaller images per request",
            {"pixels": total, "max_request_pixels": limits.max_request_pixels},
        )


def probe_image(blob: bytes, index: int) -> tuple[int, int]:
    """(width, height) of one encoded image from its header alone.

    415 for other formats or unreadable headers; 413 when Pillow's own bomb guard trips.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob)) as image:
                if image.format not in ALLOWED_FORMATS:
                    raise UnsupportedMediaError(
                        f"image {index}: format {image.format} is not accepted; send PNG, JPEG or WebP",
                        {"index": index, "format": image.format},
                    )
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLargeError(
            f"image {index}: its header declares more pixels than any image this server decodes", {"index": index}
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error):
        raise UnsupportedMediaError(
            f"image {index}: cannot be decoded as PNG, JPEG or WebP (not a readable image header)", {"index": index}
        ) from None
    return width, height


def admit_files(blobs: list[bytes], limits: InputLimits) -> AdmittedFiles:
    """Check count, formats and pixel budget of encoded images from their headers."""
    check_count(len(blobs), limits)
    sizes = [probe_image(blob, i) for i, blob in enumerate(blobs)]
    check_pixels(sizes, limits)
    return AdmittedFiles(list(blobs), sizes)


def parse_npy_header(body: bytes) -> tuple[str, bool, tuple[int, ...], int]:
    """(dtype descr, fortran order, shape, data offset) of a ``.npy`` body, without numpy's parser."""
    if len(body) < 10 or not body.startswith(NPY_MAGIC):
        raise RequestInvalidError("body is not a valid .npy array: no NUMPY magic")
    major = body[6]
    if major == 1:
        (length,), start = struct.unpack("<H", body[8:10]), 10
    elif major in (2, 3) and len(body) >= 12:
        (length,), start = struct.unpack("<I", body[8:12]), 12
    else:
        raise RequestInvalidError(f"body is not a valid .npy array: format version {major} is not supported")
    if length > 65536 or start + length > len(body):
        raise RequestInvalidError("body is not a valid .npy array: header truncated or too long")
    try:
        text = body[start : start + length].decode("latin1").strip()
    except UnicodeDecodeError:
        raise RequestInvalidError("body is not a valid .npy array: header is not text") from None
    found = _NPY_HEADER.match(text)
    if found is None:
        raise RequestInvalidError(
            "body is not a valid .npy array: header is not a plain description (descr, fortran_order, shape)"
        )
    dims = _DIGITS.findall(found["shape"])
    if max(map(len, dims), default=0) > 12:
        raise PayloadTooLargeError(".npy header declares an absurdly large dimension")
    shape = tuple(map(int, dims))
    return found["descr"], found["fortran"] == "True", shape, start + length


def admit_npy(body: bytes, limits: InputLimits) -> AdmittedNpy:
    """Check a ``.npy`` batch's header: uint8, N x H x W x 3 (or N x H x W), count, pixels, data length."""
    descr, fortran_order, shape, offset = parse_npy_header(body)
    if descr not in NPY_UINT8:
        raise RequestInvalidError(f".npy batch must be uint8, got dtype '{descr}'", {"dtype": descr})
    if len(shape) == 3:
        shape = (*shape, 1)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise RequestInvalidError(
            f".npy batch must have shape N x H x W x 3 (or N x H x W), got {shape}", {"shape": list(shape)}
        )
    n, height, width, channels = shape
    check_count(n, limits)
    check_batch_pixels(n, width, height, limits)
    expected = n * height * width * channels
    if len(body) - offset != expected:
        raise RequestInvalidError(
            f".npy data holds {len(body) - offset} bytes, its header declares {expected}",
            {"bytes": len(body) - offset, "declared": expected},
        )
    return AdmittedNpy(body, (n, height, width, channels), offset, fortran_order)
