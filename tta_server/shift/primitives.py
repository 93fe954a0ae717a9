"""Batched image primitives the corruptions are built from.

Every function works on a whole batch at once (``N x H x W x C`` float32 arrays in [0, 1],
or ``N x H x W`` maps), because corrupting 10,000 images one at a time in Python costs
minutes while one vectorized call costs seconds. Where the CIFAR-10-C generator used a
particular library call (scikit-image's Gaussian filter, SciPy's order-1 zoom, OpenCV's
affine warp with reflected borders, ImageMagick's motion blur), the primitive reproduces
that call's boundary handling and interpolation so the corrupted images have the same
statistics as the released dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

BorderMode = Literal["nearest", "reflect", "mirror"]
"""How pixels past the edge are made up: ``nearest`` repeats the edge pixel, ``reflect``
mirrors about the edge (``d c b a | a b c d``, SciPy's ``reflect``), ``mirror`` mirrors about
the edge pixel (``d c b | a b c d``, OpenCV's ``BORDER_REFLECT_101``, SciPy's ``mirror``)."""
MirrorMode = Literal["reflect", "mirror"]


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1] (a fresh array the corruption may modify)."""
    out: np.ndarray = images.astype(np.float32) / np.float32(255.0)
    return out


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """float images in [0, 1] (values outside are clipped) -> rounded uint8."""
    out: np.ndarray = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def gaussian_blur(
    x: np.ndarray, sigma: float, mode: BorderMode = "nearest", truncate: float = 4.0, radius: int | None = None
) -> np.ndarray:
    """Gaussian blur over the two spatial axes of ``N x H x W [x C]``.

    The default border and truncation are scikit-image's ``filters.gaussian`` defaults, which
    is what the CIFAR-10-C generator called; ``radius`` fixes the kernel half-width instead
    (OpenCV's ``GaussianBlur`` with an explicit kernel size).
    """
    if sigma <= 0:
        return x.copy()
    spatial = (0.0, sigma, sigma) + (0.0,) * (x.ndim - 3)
    width = None if radius is None else (0, radius, radius) + (0,) * (x.ndim - 3)
    out: np.ndarray = ndimage.gaussian_filter(x, sigma=spatial, mode=mode, truncate=truncate, radius=width)
    return out


def sample_bilinear(images: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: MirrorMode) -> np.ndarray:
    """Bilinear interpolation of ``N x H x W x C`` images at fractional ``rows``/``cols`` (``N x h x w``).

    Runs as one torch ``grid_sample`` call. Coordinates outside the image are reflected: for
    ``mirror`` about the edge pixel centres (``align_corners=True``), which is OpenCV's
    ``warpAffine`` with ``BORDER_REFLECT_101``; for ``reflect`` about the image border
    (``align_corners=False``), which is SciPy's order-1 ``map_coordinates(mode="reflect")``.
    Both equivalences were checked numerically to float32 precision.
    """
    _, h, w, _ = images.shape
    if mode == "mirror":
        gx, gy = 2 * cols / max(w - 1, 1) - 1, 2 * rows / max(h - 1, 1) - 1
    else:
        gx, gy = (2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1
    t = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32))
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1).astype(np.float32))
    with torch.no_grad():
        out = F.grid_sample(t, grid, mode="bilinear", padding_mode="reflection", align_corners=mode == "mirror")
    return np.ascontiguousarray(out.numpy().transpose(0, 2, 3, 1))


def filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every image and channel of ``N x H x W x C`` with one 2-D kernel.

    Borders mirror about the edge pixel: OpenCV ``filter2D``'s default ``BORDER_REFLECT_101``.
    """
    out: np.ndarray = ndimage.correlate(x, kernel[None, :, :, None].astype(x.dtype), mode="mirror")
    return out


def zoom_matrix(size: int, factor: float) -> np.ndarray:
    """The ``size x size`` linear map of one axis under :func:`clipped_zoom`.

    Row ``i`` holds the weights of the input pixels that output pixel ``i`` interpolates.
    Writing the zoom as a matrix turns it into two small matrix products per batch, which is
    an order of magnitude faster than resampling each zoom factor with an interpolation call.
    """
    crop = math.ceil(size / factor)
    top = (size - crop) // 2
    zoomed = round(crop * factor)
    trim = (zoomed - size) // 2
    out = np.arange(trim, trim + size, dtype=np.float64)
    src = out * (crop - 1) / (zoomed - 1) if zoomed > 1 else np.zeros_like(out)
    low = np.minimum(np.floor(src).astype(np.int64), crop - 1)
    frac = src - low
    high = np.minimum(low + 1, crop - 1)
    matrix = np.zeros((size, size), dtype=np.float64)
    rows = np.arange(size)
    np.add.at(matrix, (rows, top + low), 1 - frac)
    np.add.at(matrix, (rows, top + high), frac)
    return matrix.astype(np.float32)


def zoom_sum(x: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Sum over ``factors`` of :func:`clipped_zoom` of an ``N x H x W x C`` batch.

    The batch is laid out once as ``H x (N * C * W)`` so that each zoom is two large matrix
    products (width, then height) with no transposes in between: about 4 GFLOP per factor
    for 10,000 CIFAR images, where per-image interpolation calls would take minutes.
    """
    n, h, w, c = x.shape
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 3, 2), dtype=np.float32))
    total = torch.zeros_like(t)
    with torch.no_grad():
        for factor in factors:
            row_matrix, col_matrix = zoom_matrix(h, float(factor)), zoom_matrix(w, float(factor))
            if np.array_equal(row_matrix, np.eye(h)) and np.array_equal(col_matrix, np.eye(w)):
                total += t  # small factors round back to the same size: no zoom at all
                continue
            rows = torch.from_numpy(row_matrix)
            cols_t = torch.from_numpy(np.ascontiguousarray(col_matrix.T))
            across = torch.matmul(t.reshape(-1, w), cols_t).reshape(h, -1)
            total += torch.matmul(rows, across).reshape(h, n, c, w)
    return np.ascontiguousarray(total.numpy().transpose(1, 0, 3, 2))


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre of every ``N x H x W x C`` image by ``factor`` (>= 1), keeping the size.

    Crops the central ``ceil(H / factor)`` pixels and enlarges them with order-1 spline
    interpolation to ``round(crop * factor)`` pixels, SciPy ``zoom`` style (corner pixels map
    to corner pixels), then keeps the central ``H`` pixels; likewise for the width.
    """
    return zoom_sum(x, [factor])


def motion_blur(x: np.ndarray, radius: int, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick-style motion blur of ``N x H x W x C`` with one angle per image.

    ImageMagick's ``-motion-blur radius x sigma + angle`` averages ``2 * radius + 1`` pixels
    along a ray from each pixel, weighted by a one-sided Gaussian of the distance (so the
    streak trails in one direction), with the edge pixel repeated past the border. Each tap
    shifts every image by its own integer offset; images sharing an offset are moved together
    as one slice of an edge-padded copy, which is far cheaper than a per-pixel gather.
    """
    _, h, w, _ = x.shape
    taps = np.arange(2 * radius + 1, dtype=np.float64)
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    theta = np.deg2rad(angles_deg.astype(np.float64))
    pad = min(len(taps), max(h, w))
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros_like(x, dtype=np.float32)
    for i, weight in enumerate(weights):
        dx = np.clip(np.ceil(i * np.cos(theta) - 0.5).astype(np.int64), -pad, pad)
        dy = np.clip(np.ceil(i * np.sin(theta) - 0.5).astype(np.int64), -pad, pad)
        keys = (dy + pad) * (2 * pad + 1) + (dx + pad)
        for key in np.unique(keys):
            members = np.flatnonzero(keys == key)
            top, left = int(dy[members[0]]) + pad, int(dx[members[0]]) + pad
            window = padded[members, top : top + h, left : left + w]
            out[members] += np.float32(weight) * window
    return out


def plasma_fractal(count: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` diamond-square height maps of ``size x size`` (a power of two), in [0, 1].

    Each octave fills square centres and then diamond centres with the mean of their four
    neighbours (wrapping around the edges) plus a uniform displacement; the displacement
    shrinks by ``decay`` squared per octave, as in the CIFAR-10-C fog generator, so a
    smaller decay gives a rougher fog. All maps are built together, one octave at a time.
    """
    if size < 2 or size & (size - 1):
        raise ValueError(f"plasma map size must be a power of two >= 2, got {size}")
    height = np.zeros((count, size, size), dtype=np.float64)
    step, wibble = size, 100.0

    def displaced(total: np.ndarray) -> np.ndarray:
        return total / 4.0 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = height[:, ::step, ::step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        height[:, half::step, half::step] = displaced(square)
        centres = height[:, half::step, half::step]
        corners = height[:, ::step, ::step]
        top_edge = corners + np.roll(corners, -1, axis=2) + centres + np.roll(centres, 1, axis=1)
        height[:, ::step, half::step] = displaced(top_edge)
        left_edge = corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=2)
        height[:, half::step, ::step] = displaced(left_edge)
        step //= 2
        wibble /= decay
    height -= height.min(axis=(1, 2), keepdims=True)
    height /= np.maximum(height.max(axis=(1, 2), keepdims=True), 1e-12)
    return height.astype(np.float32)
