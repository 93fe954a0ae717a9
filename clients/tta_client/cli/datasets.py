"""Labelled images for the replay and load tools: an ImageFolder directory or an ``.npz``.

ImageFolder: ``root/<class name>/<image file>``, classes in alphabetical order (the
torchvision convention, which is also CIFAR-10's label order). ``.npz``: ``x`` uint8
``N x H x W x 3`` and ``y`` integer labels. Files of an ImageFolder stay encoded until a
caller needs pixels: replaying sends them as they are, so the server decodes what a camera
would send, and only a corruption forces decoding here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

UInt8Array = npt.NDArray[np.uint8]
IntArray = npt.NDArray[np.int64]


class DatasetError(ValueError):
    """The dataset path is missing, empty or not in a supported layout."""


@dataclass
class Dataset:
    """Labels plus either decoded pixels (``pixels``) or image files (``files``), in replay order."""

    name: str
    labels: IntArray
    class_names: list[str] | None
    pixels: UInt8Array | None = None
    files: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, order: npt.NDArray[np.intp]) -> Dataset:
        """The images at ``order`` (a permutation or a prefix of one)."""
        return Dataset(
            self.name,
            self.labels[order],
            self.class_names,
            self.pixels[order] if self.pixels is not None else None,
            [self.files[i] for i in order] if self.files is not None else None,
        )

    def batch(self, start: int, stop: int) -> UInt8Array | list[Path]:
        """Images ``start:stop`` as a uint8 batch, or as file paths when not decoded."""
        if self.pixels is not None:
            return self.pixels[start:stop]
        if self.files is None:
            raise DatasetError(f"dataset {self.name} holds neither pixels nor files")
        return self.files[start:stop]

    def decoded(self) -> Dataset:
        """The same images as pixels (all must share one size, as a corruption batch needs)."""
        if self.pixels is not None or self.files is None:
            return self
        from PIL import Image

        arrays = []
        for path in self.files:
            with Image.open(io.BytesIO(path.read_bytes())) as img:
                arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise DatasetError(f"images differ in size ({sorted(sizes)[:3]} ...); resize them to one size first")
        return Dataset(self.name, self.labels, self.class_names, pixels=np.stack(arrays))


def load_npz(path: Path) -> Dataset:
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data or "y" not in data:
            raise DatasetError(f"{path} must hold arrays 'x' (uint8 N x H x W x 3) and 'y' (labels); has {data.files}")
        x, y = data["x"], data["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DatasetError(f"{path}: 'x' must be uint8 N x H x W x 3, got {x.dtype} {x.shape}")
    if y.shape != (len(x),):
        raise DatasetError(f"{path}: 'y' must hold one label per image, got shape {y.shape} for {len(x)} images")
    return Dataset(path.name, y.astype(np.int64), None, pixels=x)


def load_image_folder(root: Path) -> Dataset:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [index] * len(found)
    if not files:
        raise DatasetError(f"{root} holds no images in class folders (expected {root}/<class>/<image>.jpg)")
    return Dataset(f"{root.parent.name}/{root.name}", np.asarray(labels, dtype=np.int64), classes, files=files)


def load_dataset(path: Path) -> Dataset:
    """An ``.npz`` file or an ImageFolder directory."""
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix == ".npz" and path.is_file():
        return load_npz(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    raise DatasetError(f"{path}: expected an ImageFolder directory or an .npz file")


def label_map(dataset: Dataset, model_classes: list[str]) -> IntArray:
    """Dataset labels as the model's class indices: by class name when the folders name them, else as given."""
    if dataset.class_names and set(dataset.class_names) <= set(model_classes):
        index = {name: i for i, name in enumerate(model_classes)}
        mapping = np.asarray([index[n] for n in dataset.class_names], dtype=np.int64)
        return mapping[dataset.labels]
    if len(dataset) and (dataset.labels.min() < 0 or dataset.labels.max() >= len(model_classes)):
        raise DatasetError(
            f"labels run from {dataset.labels.min()} to {dataset.labels.max()} but the model has "
            f"{len(model_classes)} classes"
        )
    return dataset.labels
