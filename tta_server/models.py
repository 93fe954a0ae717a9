"""Loaded models of one server process: the catalogue plus the models held in memory."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from tta_server.devices import DeviceChoice, resolve_device
from tta_server.zoo.catalogue import Catalogue, LoadedModel, build_catalogue

log = logging.getLogger(__name__)


class ModelHub:
    """Thread-safe lazy loading of catalogue models onto one device."""

    def __init__(self, catalogue: Catalogue, device: str) -> None:
        self.catalogue = catalogue
        self.device = device
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, models_dir: Path, model_config_file: Path | None, device: DeviceChoice | str) -> ModelHub:
        """The catalogue of ``models_dir`` (plus bring-your-own entries) on the resolved device."""
        return cls(build_catalogue(models_dir, model_config_file), resolve_device(device))

    def get(self, name: str) -> LoadedModel:
        """The loaded model ``name``, loading it on first use."""
        with self._lock:
            if name not in self._loaded:
                log.info("loading model %s on %s", name, self.device)
                self._loaded[name] = self.catalogue.load(name, self.device)
            return self._loaded[name]

    def loaded_sha256(self, name: str) -> str | None:
        """The weights hash of model ``name`` if it is in memory (never loads it: safe on the event loop)."""
        with self._lock:
            loaded = self._loaded.get(name)
        return loaded.sha256 if loaded is not None else None

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)
