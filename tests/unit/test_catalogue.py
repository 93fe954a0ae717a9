from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from adapters.norms import NormKind
from tta_server.data.datasets import load_labeled_images
from tta_server.zoo.catalogue import (
    CatalogueError,
    ModelSpec,
    build_catalogue,
    file_sha256,
    project_specs,
    user_specs,
)
from tta_server.zoo.evaluate import top1_accuracy
from tta_server.zoo.resnet_cifar import cifar_resnet


def test_third_party_resnet20_reproduces_published_accuracy(shared_dir: Path) -> None:
    catalogue = build_catalogue(shared_dir / "models")
    loaded = catalogue.load("resnet20")
    data = load_labeled_images(shared_dir / "data" / "cifar10_test_first846.npz")
    acc = top1_accuracy(loaded.model, data, loaded.spec.mean, loaded.spec.std)
    assert acc >= 0.91
    assert loaded.sha256 == loaded.spec.sha256
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training


def test_third_party_hash_is_pinned(tmp_path: Path, shared_dir: Path) -> None:
    fake = tmp_path / "resnet-cifar10"
    fake.mkdir()
    torch.save({"state_dict": cifar_resnet(20).state_dict()}, fake / "resnet20-12fca82f.th")
    with pytest.raises(CatalogueError, match="expected 12fca82f"):
        build_catalogue(tmp_path).load("resnet20")


def test_unknown_model_lists_available(shared_dir: Path) -> None:
    with pytest.raises(CatalogueError, match="unknown model 'nope'; available: resnet20"):
        build_catalogue(shared_dir / "models").get("nope")


def _write_config(tmp_path: Path, entry: dict[str, object]) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [entry]}))
    return path


BYO = {
    "name": "my-r18",
    "arch": "torchvision:resnet18",
    "weights": "r18.safetensors",
    "classes": ["a", "b", "c"],
    "input_size": 64,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
}


def test_bring_your_own_torchvision_model(tmp_path: Path, shared_dir: Path) -> None:
    model = torchvision.models.resnet18(num_classes=3)
    save_file(model.state_dict(), str(tmp_path / "r18.safetensors"))
    catalogue = build_catalogue(shared_dir / "models", _write_config(tmp_path, BYO))
    loaded = catalogue.load("my-r18")
    assert loaded.spec.origin == "user"
    assert loaded.spec.weights == (tmp_path / "r18.safetensors").resolve()
    assert loaded.sha256 == file_sha256(tmp_path / "r18.safetensors")
    assert loaded.model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_bring_your_own_torch_checkpoint_with_module_prefix(tmp_path: Path, shared_dir: Path) -> None:
    model = cifar_resnet(20, "gn", num_classes=3)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "m.pt")
    entry = {**BYO, "arch": "cifar_resnet20", "norm": "gn", "weights": "m.pt", "input_size": 32}
    loaded = build_catalogue(shared_dir / "models", _write_config(tmp_path, entry)).load("my-r18")
    assert loaded.spec.norm is NormKind.GN


def test_bring_your_own_errors_are_clear(tmp_path: Path, shared_dir: Path) -> None:
    cfg = _write_config(tmp_path, BYO)
    with pytest.raises(CatalogueError, match="weights file not found"):
        build_catalogue(shared_dir / "models", cfg).load("my-r18")
    save_file(torchvision.models.resnet18(num_classes=5).state_dict(), str(tmp_path / "r18.safetensors"))
    with pytest.raises(CatalogueError, match="does not fit torchvision:resnet18"):
        build_catalogue(shared_dir / "models", cfg).load("my-r18")
    with pytest.raises(CatalogueError, match="entry 0"):
        user_specs(_write_config(tmp_path, {**BYO, "std": [0, 1, 1]}))
    with pytest.raises(CatalogueError, match="has no architecture 'resnet9000'"):
        build_catalogue(shared_dir / "models", _write_config(tmp_path, {**BYO, "arch": "torchvision:resnet9000"})).load(
            "my-r18"
        )
    with pytest.raises(CatalogueError, match="not found"):
        user_specs(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CatalogueError, match="not valid JSON"):
        user_specs(tmp_path / "bad.json")


def test_spec_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match="use 'cifar_resnet<depth>' or 'torchvision:<model name>'"):
        ModelSpec(name="x", arch="vgg", weights=Path("w"), classes=("a", "b"), mean=(0, 0, 0), std=(1, 1, 1))


def test_norm_declared_must_match_model(tmp_path: Path, shared_dir: Path) -> None:
    save_file(cifar_resnet(20, "bn", num_classes=3).state_dict(), str(tmp_path / "m.safetensors"))
    entry = {**BYO, "arch": "cifar_resnet20", "norm": "bn", "weights": "m.safetensors"}
    # a BN checkpoint declared as LN cannot load: LN layers have no running statistics
    with pytest.raises(CatalogueError, match="does not fit"):
        build_catalogue(shared_dir / "models", _write_config(tmp_path, {**entry, "norm": "ln"})).load("my-r18")


@pytest.mark.parametrize("spec", project_specs(), ids=lambda s: s.name)
def test_project_models_match_their_cards(spec: ModelSpec, shared_dir: Path) -> None:
    """Each committed model loads, matches its card's hash, and reaches the card's clean accuracy."""
    catalogue = build_catalogue(shared_dir / "models")
    loaded = catalogue.load(spec.name)
    assert loaded.sha256 == spec.sha256
    data = load_labeled_images(shared_dir / "data" / "cifar10-jpeg" / "test")
    acc = top1_accuracy(loaded.model, data, spec.mean, spec.std)
    assert spec.clean_top1 is not None
    assert acc == pytest.approx(spec.clean_top1, abs=0.002)
