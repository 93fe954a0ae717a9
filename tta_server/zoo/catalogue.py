"""The model catalogue: name -> architecture, weights, input transform, classes, norm type, hash.

Three sources of entries, all loaded offline (nothing is ever downloaded):

- ``third-party``: the BatchNorm CIFAR ResNets trained on the original CIFAR-10 release,
  read from the models directory (default ``../shared/models``), pinned by sha256;
- ``project``: CIFAR ResNets with BN, GN and LN trained by ``tta-server train``, shipped
  inside the package as safetensors with a JSON model card each;
- ``user``: bring-your-own entries from a JSON file (a torchvision architecture or a CIFAR
  ResNet, a local checkpoint, mean/std and class names).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors.torch import load_file
from torch import nn

from adapters.norms import NormKind, detect_norm_kinds
from tta_server.zoo.resnet_cifar import DEPTH_BLOCKS, cifar_resnet
from tta_server.zoo.transforms import ResizeMode, pad_colour

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CatalogueError(ValueError):
    """A catalogue entry that cannot be built or loaded; the message names the entry and the cause."""


class ModelSpec(BaseModel):
    """One catalogue entry. ``arch`` is ``cifar_resnet<depth>`` or ``torchvision:<name>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    arch: str
    norm: NormKind | None = Field(None, description="checked against the built model; filled in when omitted")
    weights: Path
    classes: tuple[str, ...] = Field(min_length=2)
    input_size: int = Field(32, ge=8, le=1024)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="expected hash of the weights file")
    clean_top1: float | None = Field(None, ge=0, le=1)
    clean_top1_data: str | None = None
    resize_mode: ResizeMode = Field(
        ResizeMode.RESIZE_CROP,
        description="how inputs of another size are fitted: squash, resize_crop (shorter side, then centre crop) "
        "or letterbox (fit inside, pad with the mean colour); inputs at input_size are never resampled",
    )
    card: Path | None = Field(None, description="JSON model card (training data, schedule, measured accuracy)")
    origin: Literal["third-party", "project", "user"] = "user"
    description: str = ""

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        """The ``letterbox`` padding: the mean colour, which normalizes to zero (least shift of BN statistics)."""
        return pad_colour(self.mean)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("std values must be positive")
        return v

    @model_validator(mode="after")
    def _known_arch(self) -> ModelSpec:
        if self.arch.startswith("cifar_resnet"):
            depth = self.arch.removeprefix("cifar_resnet")
            if not depth.isdigit() or int(depth) not in DEPTH_BLOCKS:
                raise ValueError(f"arch {self.arch!r}: CIFAR ResNet depth must be one of {sorted(DEPTH_BLOCKS)}")
        elif not self.arch.startswith("torchvision:"):
            raise ValueError(f"arch {self.arch!r}: use 'cifar_resnet<depth>' or 'torchvision:<model name>'")
        return self


@dataclass(frozen=True)
class LoadedModel:
    """A built model with its weights loaded, frozen, in eval mode, plus its spec and file hash."""

    spec: ModelSpec
    model: nn.Module
    sha256: str


@lru_cache(maxsize=64)
def _file_sha256(path: Path, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached while the file is unchanged."""
    st = path.stat()
    return _file_sha256(path.resolve(), st.st_mtime_ns, st.st_size)


def build_architecture(spec: ModelSpec) -> nn.Module:
    """An untrained module of the spec's architecture (no weights are fetched)."""
    if spec.arch.startswith("cifar_resnet"):
        return cifar_resnet(int(spec.arch.removeprefix("cifar_resnet")), spec.norm or NormKind.BN, len(spec.classes))
    import torchvision

    name = spec.arch.removeprefix("torchvision:")
    if name not in torchvision.models.list_models():
        raise CatalogueError(f"model '{spec.name}': torchvision has no architecture '{name}'")
    module: nn.Module = torchvision.models.get_model(name, weights=None, num_classes=len(spec.classes))
    return module


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch checkpoint loaded with ``weights_only=True``.

    Accepts a bare state dict or one wrapped under ``state_dict`` / ``model``, and strips a
    leading ``module.`` (from DataParallel) from every key.
    """
    if path.suffix == ".safetensors":
        raw: Any = load_file(str(path))
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CatalogueError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(raw, dict):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CatalogueError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in raw.items()}


def load_spec(spec: ModelSpec, device: str = "cpu") -> LoadedModel:
    """Build, load and freeze the model of ``spec``; clear errors for missing files and shape mismatches."""
    if not spec.weights.is_file():
        raise CatalogueError(f"model '{spec.name}': weights file not found: {spec.weights}")
    digest = file_sha256(spec.weights)
    if spec.sha256 is not None and digest != spec.sha256:
        raise CatalogueError(
            f"model '{spec.name}': weights {spec.weights} have sha256 {digest}, expected {spec.sha256}"
        )
    model = build_architecture(spec)
    state = read_state_dict(spec.weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CatalogueError(f"model '{spec.name}': checkpoint does not fit {spec.arch}: {exc}") from exc
    kinds = detect_norm_kinds(model)
    if spec.norm is not None and spec.norm not in kinds:
        raise CatalogueError(f"model '{spec.name}' declares norm {spec.norm.value} but contains {sorted(kinds)}")
    model.eval().requires_grad_(False)
    return LoadedModel(spec, model.to(device), digest)


def read_card(spec: ModelSpec) -> dict[str, Any] | None:
    """The spec's JSON model card, or None when it has none.

    A card that is missing or not a JSON object is a :class:`CatalogueError`: a card that was
    declared but cannot be shown should be noticed, not silently dropped.
    """
    if spec.card is None:
        return None
    try:
        card = json.loads(spec.card.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogueError(f"model '{spec.name}': cannot read its card {spec.card}: {exc}") from exc
    if not isinstance(card, dict):
        raise CatalogueError(f"model '{spec.name}': card {spec.card} is not a JSON object")
    return card


class Catalogue:
    """Named model specs, in a stable order, with lookup errors that list what exists."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise CatalogueError(f"duplicate model name '{spec.name}' in the catalogue")
            self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return list(self._specs)

    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def get(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise CatalogueError(f"unknown model '{name}'; available: {', '.join(self._specs)}") from None

    def load(self, name: str, device: str = "cpu") -> LoadedModel:
        return load_spec(self.get(name), device)


THIRD_PARTY = (
    ("resnet20", 20, "resnet20-12fca82f.th", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
    ("resnet32", 32, "resnet32-d509ac18.th", "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
    ("resnet44", 44, "resnet44-014dd654.th", "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
    ("resnet56", 56, "resnet56-4bfd9763.th", "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"),
)
"""(name, depth, file, sha256) of the third-party BN CIFAR ResNets in ``<models_dir>/resnet-cifar10``."""

THIRD_PARTY_CLEAN_TOP1: dict[str, float] = {
    "resnet20": 0.8103,
    "resnet32": 0.8256,
    "resnet44": 0.8267,
    "resnet56": 0.8320,
}
"""Top-1 on cifar10-jpeg/test measured with ``tta-server models --evaluate`` (see docs/models.md)."""


def third_party_specs(models_dir: Path) -> list[ModelSpec]:
    """The BN CIFAR ResNets trained on the original CIFAR-10 release (weights outside the repo)."""
    return [
        ModelSpec(
            name=name,
            arch=f"cifar_resnet{depth}",
            norm=NormKind.BN,
            weights=models_dir / "resnet-cifar10" / filename,
            classes=CIFAR10_CLASSES,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            sha256=digest,
            clean_top1=THIRD_PARTY_CLEAN_TOP1.get(name),
            clean_top1_data="cifar10-jpeg/test" if name in THIRD_PARTY_CLEAN_TOP1 else None,
            origin="third-party",
            description=f"ResNet-{depth} (BN) trained on the original CIFAR-10 release; BSD-2-Clause weights",
        )
        for name, depth, filename, digest in THIRD_PARTY
    ]


def project_specs(weights_dir: Path = WEIGHTS_DIR) -> list[ModelSpec]:
    """Models trained by ``tta-server train``, one JSON model card per safetensors file."""
    specs = []
    for card_path in sorted(weights_dir.glob("*.json")):
        card = json.loads(card_path.read_text())
        specs.append(
            ModelSpec(
                name=card["name"],
                arch=card["arch"],
                norm=NormKind(card["norm"]),
                weights=card_path.with_suffix(".safetensors"),
                classes=tuple(card["classes"]),
                input_size=card["input_size"],
                mean=tuple(card["mean"]),
                std=tuple(card["std"]),
                sha256=card["sha256"],
                clean_top1=card["clean_top1"],
                clean_top1_data=card["test_data"],
                card=card_path,
                origin="project",
                description=f"CIFAR ResNet with {card['norm'].upper()}, trained {card['epochs']} epochs "
                f"on {card['train_data']}",
            )
        )
    return specs


def user_specs(path: Path) -> list[ModelSpec]:
    """Bring-your-own entries from a JSON file: ``{"models": [ {spec fields}, ... ]}``.

    Relative weight and card paths are resolved against the file's folder.
    """
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CatalogueError(f"model config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise CatalogueError(f"model config {path} is not valid JSON: {exc}") from exc
    entries = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise CatalogueError(f"model config {path} must be an object with a 'models' list")
    specs = []
    for i, entry in enumerate(entries):
        try:
            spec = ModelSpec.model_validate({"origin": "user", **entry})
        except ValidationError as exc:
            raise CatalogueError(f"model config {path}, entry {i}: {exc}") from exc
        if not spec.weights.is_absolute():
            spec = spec.model_copy(update={"weights": (path.parent / spec.weights).resolve()})
        if spec.card is not None and not spec.card.is_absolute():
            spec = spec.model_copy(update={"card": (path.parent / spec.card).resolve()})
        specs.append(spec)
    return specs


def build_catalogue(models_dir: Path, user_config: Path | None = None) -> Catalogue:
    """Third-party + project + user entries, in that order."""
    specs = third_party_specs(models_dir) + project_specs()
    if user_config is not None:
        specs += user_specs(user_config)
    return Catalogue(specs)
