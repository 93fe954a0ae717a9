"""Load labelled image sets from any path as one uint8 NHWC array plus integer labels.

Two on-disk layouts are accepted, so a user can bring data the project has never seen:

- an ImageFolder tree (``root/<class>/<image>``; class index = sorted folder names, the
  torchvision convention), decoded once and cached as .npz under a cache directory keyed by
  the tree's path, file count and modification times, because decoding 50,000 JPEGs on every
  run costs far more than the run itself;
- an ``.npz`` file with ``x`` (uint8, N x H x W x 3) and ``y`` (integer labels), and an
  optional ``classes`` array of names.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset path or file that cannot be read as labelled images."""


@dataclass(frozen=True)
class LabeledImages:
    """Images as uint8 (N, H, W, 3) RGB, labels as int64 (N,), and the class names."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.dtype != np.uint8 or self.x.ndim != 4 or self.x.shape[-1] != 3:
            raise DatasetError(f"images must be uint8 NxHxWx3, got {self.x.dtype} {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise DatasetError(f"{self.x.shape[0]} images but labels of shape {self.y.shape}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, indices: np.ndarray) -> LabeledImages:
        """The images at ``indices`` (a view when possible, a copy otherwise)."""
        return LabeledImages(self.x[indices], self.y[indices], self.classes)


def default_cache_dir() -> Path:
    """Where decoded datasets are cached: $TTA_CACHE_DIR or ~/.cache/tta-server."""
    return Path(os.environ.get("TTA_CACHE_DIR", Path.home() / ".cache" / "tta-server"))


def load_labeled_images(path: str | Path, cache_dir: Path | None = None) -> LabeledImages:
    """Load an ImageFolder directory or an .npz file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"dataset path does not exist: {p}")
    if p.is_dir():
        return load_image_folder(p, cache_dir)
    if p.suffix == ".npz":
        return load_npz(p)
    raise DatasetError(f"unsupported dataset {p}: expected an ImageFolder directory or an .npz file")


def load_npz(path: Path) -> LabeledImages:
    """Read ``x`` (uint8 NHWC), ``y`` and optional ``classes`` from an .npz file."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"x", "y"} - set(data.files)
        if missing:
            raise DatasetError(f"{path} lacks array(s) {sorted(missing)}; expected x (uint8 NHWC) and y")
        x, y = data["x"], data["y"].astype(np.int64)
        n_classes = int(y.max()) + 1 if y.size else 0
        classes = tuple(str(c) for c in data["classes"]) if "classes" in data.files else _numbered(n_classes)
    if x.dtype != np.uint8:
        raise DatasetError(f"{path}: x must be uint8, got {x.dtype}")
    return LabeledImages(np.ascontiguousarray(x), y, classes)


def _numbered(n: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(n))


def _list_image_folder(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    files = [
        (f, label)
        for label, name in enumerate(classes)
        for f in sorted((root / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DatasetError(f"{root} contains no images with suffixes {sorted(IMAGE_SUFFIXES)}")
    return classes, files


def _folder_key(root: Path, files: list[tuple[Path, int]]) -> str:
    digest = hashlib.sha256(str(root.resolve()).encode())
    for f, label in files:
        digest.update(f"{f.name}:{label}:{f.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _decode_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image_folder(root: Path, cache_dir: Path | None = None) -> LabeledImages:
    """Decode an ImageFolder tree (all images must share one size), cached as .npz."""
    classes, files = _list_image_folder(root)
    cache = (cache_dir or default_cache_dir()) / "datasets" / f"{root.name}-{_folder_key(root, files)}.npz"
    if cache.exists():
        return load_npz(cache)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(_decode_rgb, (f for f, _ in files), chunksize=256))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DatasetError(f"{root}: images differ in size {sorted(shapes)[:4]}; resize them to one size first")
    data = LabeledImages(np.stack(images), np.array([label for _, label in files], dtype=np.int64), classes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temp name: two processes decoding the same folder at once (a server and a
    # training run, two training runs) must not rename each other's half-written file away.
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=data.x, y=data.y, classes=np.array(classes))
    tmp.replace(cache)
    return data
