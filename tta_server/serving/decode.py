"""Turn request payloads into one uint8 NHWC RGB batch, enforcing the input limits.

Three payloads are accepted: image files (PNG, JPEG, WebP) from multipart or base64 JSON,
and one ``.npy`` uint8 array (N x H x W x 3, or N x H x W for grayscale). Every image is
checked *before* it is decoded (format, declared pixel count: decompression bombs never get
allocated), turned upright by its EXIF orientation tag (phones store portrait photos as
landscape pixels plus a tag), converted to RGB and fitted to the model's input size, so a batch
always has a single shape. Errors name the offending image by its index.

How an image of another size is fitted is the model's ``resize_mode`` (see
:class:`tta_server.zoo.transforms.ResizeMode`); callers pass it as ``resize_mode=`` (and, for
``letterbox``, the padding colour as ``fill=``). Left out, the mode is ``squash``, the
behaviour before models declared one. An image already at the input size is never resampled,
whatever the mode, so 32x32 inputs of the CIFAR models reach the model bit-identical.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tta_server.errors import PayloadTooLargeError, RequestInvalidError, UnsupportedMediaError
from tta_server.zoo.transforms import ResizeMode, fit_geometry

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@dataclass(frozen=True)
class InputLimits:
    """Bounds on one request; from the settings."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_images: int = 256
    max_pixels: int = 4096 * 4096


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


def decode_image_files(
    blobs: Sequence[bytes],
    size: int,
    limits: InputLimits,
    *,
    resize_mode: ResizeMode | str = ResizeMode.SQUASH,
    fill: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Decode encoded images into (N, size, size, 3) uint8 RGB, upright by their EXIF orientation."""
    resize_mode = ResizeMode(resize_mode)
    _check_count(len(blobs), limits)
    out = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                if image.format not in ALLOWED_FORMATS:
                    raise UnsupportedMediaError(
                        f"image {i}: format {image.format} is not accepted; send PNG, JPEG or WebP",
                        {"index": i, "format": image.format},
                    )
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise PayloadTooLargeError(
                        f"image {i}: {width}x{height} pixels exceeds the limit of {limits.max_pixels}",
                        {"index": i, "width": width, "height": height, "max_pixels": limits.max_pixels},
                    )
                image.load()
                out[i] = fit_image(_upright(image).convert("RGB"), size, resize_mode, fill)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
            raise UnsupportedMediaError(
                f"image {i}: cannot be decoded as PNG, JPEG or WebP ({exc})", {"index": i}
            ) from None
    return out


def decode_npy(
    blob: bytes,
    size: int,
    limits: InputLimits,
    *,
    resize_mode: ResizeMode | str = ResizeMode.SQUASH,
    fill: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Read one ``.npy`` uint8 batch (N,H,W,3 or N,H,W) and fit it to (N, size, size, 3).

    Arrays carry no orientation tag: they are taken as upright.
    """
    resize_mode = ResizeMode(resize_mode)
    try:
        array = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RequestInvalidError(f"body is not a valid .npy array ({exc})") from None
    if array.dtype != np.uint8:
        raise RequestInvalidError(f".npy batch must be uint8, got {array.dtype}", {"dtype": str(array.dtype)})
    if array.ndim == 3:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise RequestInvalidError(
            f".npy batch must have shape N x H x W x 3 (or N x H x W), got {array.shape}", {"shape": list(array.shape)}
        )
    _check_count(array.shape[0], limits)
    if array.shape[1] * array.shape[2] > limits.max_pixels:
        raise PayloadTooLargeError(f"images of {array.shape[2]}x{array.shape[1]} exceed {limits.max_pixels} pixels")
    if array.shape[1:3] == (size, size):
        return np.ascontiguousarray(array)
    return np.stack([fit_image(Image.fromarray(a), size, resize_mode, fill) for a in array])


def _check_count(n: int, limits: InputLimits) -> None:
    if n == 0:
        raise RequestInvalidError("the request holds no images")
    if n > limits.max_images:
        raise PayloadTooLargeError(
            f"{n} images in one request exceeds the limit of {limits.max_images}",
            {"images": n, "max_images": limits.max_images},
        )
