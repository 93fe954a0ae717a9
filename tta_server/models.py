"""Loaded models of one server process: the catalogue plus the models held in memory."""

from __future__ import annotations

import logging
import threading

import torch

from tta_server.settings import DeviceChoice, Settings
from tta_server.zoo.catalogue import Catalogue, LoadedModel, build_catalogue

log = logging.getLogger(__name__)


class DeviceError(ValueError):
    """A device that this machine does not have, or a name that is not a device choice."""


def resolve_device(choice: DeviceChoice | str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is an error.

    The one place that turns a device choice into a torch device, for the server and ``eval`` alike.
    """
    try:
        choice = DeviceChoice(choice)
    except ValueError:
        raise DeviceError(f"unknown device {choice!r}; choose auto, cpu or cuda") from None
    if choice is DeviceChoice.CUDA and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was requested but no CUDA device is available")
    if choice is DeviceChoice.AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice.value


class ModelHub:
    """Thread-safe lazy loading of catalogue models onto one device."""

    def __init__(self, catalogue: Catalogue, device: str) -> None:
        self.catalogue = catalogue
        self.device = device
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelHub:
        catalogue = build_catalogue(settings.models_dir, settings.model_config_file)
        return cls(catalogue, resolve_device(settings.device))

    def get(self, name: str) -> LoadedModel:
        """The loaded model ``name``, loading it on first use."""
        with self._lock:
            if name not in self._loaded:
                log.info("loading model %s on %s", name, self.device)
                self._loaded[name] = self.catalogue.load(name, self.device)
            return self._loaded[name]

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)
