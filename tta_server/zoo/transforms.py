"""The model-side input transform: uint8 RGB images -> normalized float tensors.

Every catalogue model states its own input size, mean and std; all image paths in the
project (HTTP requests, evaluation, training) go through this one function so that a
model never sees pixels prepared differently from how it was trained.

It also holds the geometry of fitting an image of another size into the model's square
input (:class:`ResizeMode`, :func:`fit_geometry`): a pure function of the sizes, so the
decoder, the docs and the tests agree on what each mode does without decoding anything.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F


class ResizeMode(StrEnum):
    """How an image whose size differs from the model's square input is mapped onto it.

    ``squash`` stretches the whole image to the square (no pixel lost, aspect ratio lost);
    ``resize_crop`` scales the shorter side to the input size and keeps the centre square
    (aspect ratio kept, the borders of the longer side lost: the usual evaluation transform of
    ImageNet-style models); ``letterbox`` scales the longer side to the input size and pads the
    rest (everything kept, undistorted, at the cost of padding pixels the model never saw in
    training). An image that already has the input size is passed through by every mode.
    """

    SQUASH = "squash"
    RESIZE_CROP = "resize_crop"
    LETTERBOX = "letterbox"


@dataclass(frozen=True)
class Geometry:
    """Where an image lands in the model input.

    ``source_box`` (left, top, right, bottom) is the region of the original image that is kept;
    it is scaled to ``scaled`` (width, height) and pasted at ``offset`` (x, y) of the
    ``size`` x ``size`` input. Pixels of the input outside the pasted region are padding.
    """

    size: int
    source_box: tuple[int, int, int, int]
    scaled: tuple[int, int]
    offset: tuple[int, int]

    @property
    def padded(self) -> bool:
        return self.scaled != (self.size, self.size)


def fit_geometry(width: int, height: int, size: int, mode: ResizeMode | str) -> Geometry:
    """The geometry of fitting a ``width`` x ``height`` image into ``size`` x ``size`` with ``mode``."""
    mode = ResizeMode(mode)
    if width < 1 or height < 1 or size < 1:
        raise ValueError(f"sizes must be positive, got {width}x{height} -> {size}")
    whole = (0, 0, width, height)
    if mode is ResizeMode.SQUASH or width == height:
        return Geometry(size, whole, (size, size), (0, 0))
    if mode is ResizeMode.RESIZE_CROP:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return Geometry(size, (left, top, left + side, top + side), (size, size), (0, 0))
    scale = size / max(width, height)
    scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Geometry(size, whole, scaled, ((size - scaled[0]) // 2, (size - scaled[1]) // 2))


def pad_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The uint8 RGB colour that normalizes to zero: padding that shifts normalization statistics least."""
    r, g, b = (min(255, max(0, round(255 * m))) for m in mean)
    return (r, g, b)


def to_tensor_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (numpy or torch) -> uint8 NCHW torch tensor, without copying when possible."""
    t = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape N x H x W x 3, got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2)


def normalize(
    images_nchw_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    size: int | None = None,
) -> torch.Tensor:
    """Scale to [0, 1], resize to ``size`` if it differs, and normalize per channel.

    The same operations in the same order as ``ToTensor`` + ``Normalize`` (so the values are
    bit-identical), in place on the one float copy: no second and third batch-sized buffer.
    """
    x = images_nchw_uint8.float().div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = _channel_constant(tuple(mean), x.dtype, x.device)
    s = _channel_constant(tuple(std), x.dtype, x.device)
    return x.sub_(m).div_(s)


@functools.lru_cache(maxsize=64)
def _channel_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1 x C x 1 x 1 tensor of per-channel constants, made once per model, dtype and device (read-only use)."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)
