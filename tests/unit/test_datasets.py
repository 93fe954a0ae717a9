from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tta_server.data.datasets import DatasetError, load_labeled_images


def test_npz_round_trip(tiny_npz: Path) -> None:
    data = load_labeled_images(tiny_npz)
    assert data.x.shape == (64, 32, 32, 3) and data.y.dtype == np.int64
    assert data.classes == ("0", "1", "2", "3")
    assert len(data.subset(np.array([0, 5]))) == 2


def test_image_folder_sorted_classes_and_cache(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls, value in (("cat", 10), ("ant", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), value + i, np.uint8)).save(root / cls / f"{i}.png")
    cache = tmp_path / "cache"
    data = load_labeled_images(root, cache_dir=cache)
    assert data.classes == ("ant", "cat")
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.x[0, 0, 0, 0] == 200 and data.x[3, 0, 0, 0] == 10
    assert len(list((cache / "datasets").glob("*.npz"))) == 1
    again = load_labeled_images(root, cache_dir=cache)
    assert np.array_equal(again.x, data.x)


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_labeled_images(tmp_path / "missing")
    np.savez(tmp_path / "bad.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"lacks array\(s\) \['x', 'y'\]"):
        load_labeled_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", x=np.zeros((1, 2, 2, 3), np.float32), y=np.zeros(1))
    with pytest.raises(DatasetError, match="uint8"):
        load_labeled_images(tmp_path / "float.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_labeled_images(tmp_path / "empty")
