"""CUDA checks; skipped where no GPU is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tta_server.zoo.catalogue import build_catalogue

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_catalogue_model_on_cuda_matches_cpu(shared_dir: Path) -> None:
    catalogue = build_catalogue(shared_dir / "models")
    x = torch.randn(8, 3, 32, 32)
    cpu = catalogue.load("resnet20", "cpu").model(x)
    gpu = catalogue.load("resnet20", "cuda").model(x.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)
