"""Turn request payloads into one uint8 NHWC RGB batch, enforcing the input limits.

Three payloads are accepted: image files (PNG, JPEG, WebP) from multipart or base64 JSON,
and one ``.npy`` uint8 array (N x H x W x 3, or N x H x W for grayscale). Every body is
admitted from its headers *before* it is decoded (:mod:`tta_server.serving.admission`: format,
image count, pixels per image and per request; decompression bombs never get allocated).
Each image is turned upright by its EXIF orientation tag (phones store portrait photos as
landscape pixels plus a tag), converted to RGB and fitted to the model's input size, so a batch
always has a single shape. Errors name the offending image by its index.

How an image of another size is fitted is the model's ``resize_mode`` (see
:class:`tta_server.zoo.transforms.ResizeMode`); callers pass it as ``resize_mode=`` (and, for
``letterbox``, the padding colour as ``fill=``). Left out, the mode is ``squash``, the
behaviour before models declared one. An image already at the input size is never resampled,
whatever the mode, so 32x32 inputs of the CIFAR models reach the model bit-identical.
"""

from __future__ import annotations

import asyncio
import io
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tta_server.errors import UnsupportedMediaError
from tta_server.serving.admission import AdmittedFiles, AdmittedNpy, InputLimits, admit_files, admit_npy
from tta_server.zoo.transforms import ResizeMode, fit_geometry

T = TypeVar("T")


class DecodePool:
    """Where admitted bodies are decoded: at most ``threads`` at once, never on the event loop.

    A bounded pool (rather than the default thread pool) keeps decoding from taking every core
    from the model worker; admission already refused what would not fit the budget.
    """

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tta-decode")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = [
    "DecodePool",
    "InputLimits",
    "decode_files",
    "decode_image_files",
    "decode_npy",
    "decode_npy_batch",
    "fit_image",
]


def fit_image(
    image: Image.Image,
    size: int,
    resize_mode: ResizeMode | str = ResizeMode.SQUASH,
    fill: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """An RGB image fitted to (size, size, 3) uint8 with ``resize_mode``.

    The kept region is cut out before it is resampled (not with Pillow's ``box`` argument,
    whose filter reads pixels beyond the box): nothing outside the crop reaches the model.
    """
    if image.size == (size, size):
        return np.asarray(image, dtype=np.uint8)
    geometry = fit_geometry(image.width, image.height, size, resize_mode)
    if geometry.source_box != (0, 0, image.width, image.height):
        image = image.crop(geometry.source_box)
    scaled = image.resize(geometry.scaled, Image.Resampling.BILINEAR)
    if geometry.padded:
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(scaled, geometry.offset)
        scaled = canvas
    return np.asarray(scaled, dtype=np.uint8)


def _upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: EXIF orientation applied (a phone's portrait photo stays portrait).

    A malformed EXIF block is ignored rather than failing the request: the pixels are still valid.
    """
    try:
        return ImageOps.exif_transpose(image)
    except (ValueError, TypeError, KeyError, OSError, SyntaxError, struct.error):
        return image


def decode_files(
    admitted: AdmittedFiles,
    size: int,
    *,
    resize_mode: ResizeMode | str = ResizeMode.SQUASH,
    fill: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Decode admitted images into (N, size, size, 3) uint8 RGB, upright by their EXIF orientation."""
    resize_mode = ResizeMode(resize_mode)
    out = np.empty((admitted.count, size, size, 3), dtype=np.uint8)
    for i, blob in enumerate(admitted.blobs):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                if image.size != admitted.sizes[i]:  # the bytes were admitted with this header
                    raise OSError("image size changed after admission")
                image.load()
                out[i] = fit_image(_upright(image).convert("RGB"), size, resize_mode, fill)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError):
            raise UnsupportedMediaError(
                f"image {i}: cannot be decoded as PNG, JPEG or WebP (corrupt or truncated data)", {"index": i}
            ) from None
    return out


def decode_npy_batch(
    admitted: AdmittedNpy,
    size: int,
    *,
    resize_mode: ResizeMode | str = ResizeMode.SQUASH,
    fill: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """An admitted ``.npy`` batch as (N, size, size, 3) uint8; arrays carry no orientation tag (taken as upright)."""
    resize_mode = ResizeMode(resize_mode)
    order: Literal["F", "C"] = "F" if admitted.fortran_order else "C"
    array = np.frombuffer(admitted.body, dtype=np.uint8, offset=admitted.offset).reshape(admitted.shape, order=order)
    if admitted.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[1:3] == (size, size):
        return np.array(array, order="C")  # a writable copy: the body's bytes are read-only, torch warns on them
    return np.stack([fit_image(Image.fromarray(a), size, resize_mode, fill) for a in array])


def decode_image_files(
    blobs: Sequence[bytes],
    size: int,
    limits: InputLimits,
    *,
    resize_mode: ResizeMode | str = ResizeMode.SQUASH,
    fill: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Admit, then decode, encoded images (one call for callers that hold no admitted body)."""
    return decode_files(admit_files(list(blobs), limits), size, resize_mode=resize_mode, fill=fill)


def decode_npy(
    blob: bytes,
    size: int,
    limits: InputLimits,
    *,
    resize_mode: ResizeMode | str = ResizeMode.SQUASH,
    fill: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Admit, then read, one ``.npy`` uint8 batch (N,H,W,3 or N,H,W) fitted to (N, size, size, 3)."""
    return decode_npy_batch(admit_npy(blob, limits), size, resize_mode=resize_mode, fill=fill)
