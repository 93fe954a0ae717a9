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
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

BorderMode = Literal["nearest", "reflect", "mirror"]
"""How indices past the edge are folded back: ``nearest`` repeats the edge pixel, ``reflect``
mirrors about the edge (``d c b a | a b c d``, SciPy's ``reflect``), ``mirror`` mirrors about
the edge pixel (``d c b | a b c d``, OpenCV's ``BORDER_REFLECT_101``, SciPy's ``mirror``)."""


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1] (a fresh array the corruption may modify)."""
    return images.astype(np.float32) / np.float32(255.0)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """float images in [0, 1] (values outside are clipped) -> rounded uint8."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def gaussian_blur(x: np.ndarray, sigma: float, mode: BorderMode = "nearest", truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur over the two spatial axes of ``N x H x W [x C]``.

    The default border and truncation are scikit-image's ``filters.gaussian`` defaults, which
    is what the CIFAR-10-C generator called.
    """
    if sigma <= 0:
        return x.copy()
    spatial = (0.0, sigma, sigma) + (0.0,) * (x.ndim - 3)
    out: np.ndarray = ndimage.gaussian_filter(x, sigma=spatial, mode=mode, truncate=truncate)
    return out


def fold_indices(idx: np.ndarray, size: int, mode: BorderMode) -> np.ndarray:
    """Map integer indices (any, including negative) into ``[0, size)`` with a border rule."""
    if size == 1:
        return np.zeros_like(idx)
    if mode == "nearest":
        return np.clip(idx, 0, size - 1)
    if mode == "mirror":
        period = 2 * (size - 1)
        folded = np.mod(idx, period)
        return np.where(folded >= size, period - folded, folded)
    period = 2 * size
    folded = np.mod(idx, period)
    return np.where(folded >= size, period - 1 - folded, folded)


def gather_pixels(images: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``images[n, rows[n, i, j], cols[n, i, j]]`` for an ``N x H x W x C`` batch, via one flat take.

    One ``take_along_axis`` on the flattened pixel axis is several times faster than
    three-array fancy indexing, which matters because sampling-based corruptions do
    four to twenty such gathers over the whole batch.
    """
    n, h, w, c = images.shape
    flat = images.reshape(n, h * w, c)
    index = (rows * w + cols).reshape(n, -1, 1)
    return np.take_along_axis(flat, index, axis=1).reshape(n, *rows.shape[1:], c)


def sample_bilinear(images: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: BorderMode) -> np.ndarray:
    """Bilinear interpolation of ``N x H x W x C`` images at fractional ``rows``/``cols`` (``N x h x w``).

    Neighbours outside the image are folded back with ``mode``, as OpenCV's ``warpAffine``
    and SciPy's order-1 ``map_coordinates`` do.
    """
    _, h, w, _ = images.shape
    r0 = np.floor(rows)
    c0 = np.floor(cols)
    fr = (rows - r0).astype(np.float32)[..., None]
    fc = (cols - c0).astype(np.float32)[..., None]
    r0i, c0i = r0.astype(np.int64), c0.astype(np.int64)
    ra, rb = fold_indices(r0i, h, mode), fold_indices(r0i + 1, h, mode)
    ca, cb = fold_indices(c0i, w, mode), fold_indices(c0i + 1, w, mode)
    top = gather_pixels(images, ra, ca) * (1 - fc) + gather_pixels(images, ra, cb) * fc
    bottom = gather_pixels(images, rb, ca) * (1 - fc) + gather_pixels(images, rb, cb) * fc
    out: np.ndarray = top * (1 - fr) + bottom * fr
    return out


def filter2d(x: np.ndarray, kernel: np.ndarray, mode: Literal["reflect", "replicate"] = "reflect") -> np.ndarray:
    """Correlate every channel of ``N x H x W x C`` with one 2-D kernel (torch depthwise conv).

    ``mode="reflect"`` is torch's name for OpenCV's default ``BORDER_REFLECT_101``.
    """
    kh, kw = kernel.shape
    n, h, w, c = x.shape
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).reshape(n * c, 1, h, w)
    pad = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2)
    with torch.no_grad():
        padded = F.pad(t, pad, mode=mode)
        weight = torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float32)).view(1, 1, kh, kw)
        out = F.conv2d(padded, weight)
    return np.ascontiguousarray(out.reshape(n, c, h, w).numpy().transpose(0, 2, 3, 1))


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre of every image by ``factor`` (>= 1), keeping the size.

    Crops the central ``ceil(H / factor)`` pixels and enlarges them with order-1 spline
    interpolation to ``round(crop * factor)`` pixels, SciPy ``zoom`` style (corner pixels map
    to corner pixels, which is torch's ``align_corners=True``), then trims the centre.
    """
    _, h, w, _ = x.shape
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[:, top : top + ch, left : left + cw]
    out_h, out_w = round(ch * factor), round(cw * factor)
    if (out_h, out_w) == (ch, cw):
        zoomed = np.array(crop)
    else:
        t = torch.from_numpy(np.ascontiguousarray(crop.transpose(0, 3, 1, 2)))
        with torch.no_grad():
            z = F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=True)
        zoomed = z.numpy().transpose(0, 2, 3, 1)
    trim_h, trim_w = (zoomed.shape[1] - h) // 2, (zoomed.shape[2] - w) // 2
    return np.ascontiguousarray(zoomed[:, trim_h : trim_h + h, trim_w : trim_w + w])


def motion_blur(x: np.ndarray, radius: int, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick-style motion blur of ``N x H x W x C`` with one angle per image.

    ImageMagick's ``-motion-blur radius x sigma + angle`` averages ``2 * radius + 1`` pixels
    along a ray from each pixel, weighted by a one-sided Gaussian of the distance (so the
    streak trails in one direction), with the edge pixel repeated past the border. Each tap
    is one shifted copy of the batch, shifted by a per-image integer offset.
    """
    n, h, w, _ = x.shape
    taps = np.arange(2 * radius + 1, dtype=np.float64)
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    theta = np.deg2rad(angles_deg.astype(np.float64))
    out = np.zeros_like(x, dtype=np.float32)
    row_base, col_base = np.arange(h)[None, :], np.arange(w)[None, :]
    for i, weight in enumerate(weights):
        dx = np.ceil(i * np.cos(theta) - 0.5).astype(np.int64)
        dy = np.ceil(i * np.sin(theta) - 0.5).astype(np.int64)
        rows = np.clip(row_base + dy[:, None], 0, h - 1)[:, :, None]
        cols = np.clip(col_base + dx[:, None], 0, w - 1)[:, None, :]
        out += np.float32(weight) * gather_pixels(x, np.broadcast_to(rows, (n, h, w)), np.broadcast_to(cols, (n, h, w)))
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
