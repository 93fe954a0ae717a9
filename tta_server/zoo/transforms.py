"""The model-side input transform: uint8 RGB images -> normalized float tensors.

Every catalogue model states its own input size, mean and std; all image paths in the
project (HTTP requests, evaluation, training) go through this one function so that a
model never sees pixels prepared differently from how it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


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
    """Scale to [0, 1], resize to ``size`` if it differs, and normalize per channel."""
    x = images_nchw_uint8.float().div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
