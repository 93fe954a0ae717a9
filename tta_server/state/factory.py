"""Build the state store named by the settings' ``store_url``."""

from __future__ import annotations

from tta_server.state.base import StateStore
from tta_server.state.memory import MemoryStateStore


def open_store(url: str) -> StateStore:
    """A store for ``url`` (``memory://``)."""
    if url.startswith("memory://"):
        return MemoryStateStore()
    raise ValueError(f"unsupported state store URL {url!r}")
