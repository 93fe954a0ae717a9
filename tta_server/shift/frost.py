"""Frost textures: photographs of frost shipped by the ``imagecorruptions-imaug`` package.

The package (Apache-2.0) is installed for its data only. Its Python module imports OpenCV,
numba and scikit-image at import time, so this module never imports it: it asks the import
system where the package lives (``find_spec`` does not execute the package) and reads the
image files from there. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FROST_PACKAGE = "imagecorruptions"
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
"""The textures CIFAR-10-C drew from (the package ships a sixth one that it never used)."""
CIFAR_FROST_SCALE = 0.2
"""CIFAR-10-C shrinks the photographs to a fifth so that a 32 x 32 crop shows frost structure."""
SMALLEST_SIDE = 315
"""Shortest side (pixels) of the shipped photographs, which bounds the crop size at a given scale."""


class FrostTexturesMissingError(RuntimeError):
    """The frost photographs are not installed (the ``imagecorruptions-imaug`` package)."""


def frost_dir() -> Path:
    """Folder holding the frost photographs inside the installed package."""
    spec = importlib.util.find_spec(FROST_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "frost"
        if all((folder / name).is_file() for name in FROST_FILES):
            return folder
    raise FrostTexturesMissingError(
        "frost textures not found: install the package 'imagecorruptions-imaug' (it ships them; "
        "it is a declared dependency of tta-server)"
    )


def frost_scale(height: int, width: int) -> float:
    """CIFAR-10-C's scale, or a larger one when images are too big for a crop of the shrunk texture."""
    return max(CIFAR_FROST_SCALE, (max(height, width) + 2) / SMALLEST_SIDE)


@lru_cache(maxsize=4)
def frost_textures(scale: float = CIFAR_FROST_SCALE) -> tuple[np.ndarray, ...]:
    """The frost photographs as float32 RGB arrays in [0, 255], shrunk by ``scale``.

    Shrinking is bilinear without antialiasing (OpenCV ``INTER_LINEAR`` semantics, which
    CIFAR-10-C used), so the crops keep the crisp ice edges of the original.
    """
    folder = frost_dir()
    textures = []
    for name in FROST_FILES:
        with Image.open(folder / name) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
        t = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None]
        with torch.no_grad():
            small = F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False, antialias=False)
        textures.append(np.ascontiguousarray(small[0].numpy().transpose(1, 2, 0)))
    return tuple(textures)
