"""Build the state store named by the settings' ``store_url``."""

from __future__ import annotations

from tta_server.settings import Settings
from tta_server.state.base import StateStore
from tta_server.state.memory import MemoryStateStore


def open_store(settings: Settings) -> StateStore:
    """A store for ``settings.store_url`` (``memory://``)."""
    url = settings.store_url
    if url.startswith("memory://"):
        return MemoryStateStore(settings.memory_max_streams, settings.memory_ttl_s)
    raise ValueError(f"unsupported state store URL {url!r}")
