"""Shared fixtures: where ../shared lives, small data, and a ready app client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tta_server.app import create_app
from tta_server.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (data and third-party weights); its absence is a failure."""
    if not (SHARED / "models" / "resnet-cifar10").is_dir():
        pytest.fail(f"shared data not found at {SHARED}: clone the repository next to ../shared")
    return SHARED


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    """64 random 32x32 RGB images in 4 classes, as an .npz dataset."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), y=np.arange(64) % 4)
    return path


@pytest.fixture
def settings(shared_dir: Path) -> Settings:
    return Settings(models_dir=shared_dir / "models", data_dir=shared_dir / "data", device="cpu")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c
