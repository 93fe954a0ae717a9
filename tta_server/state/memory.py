"""The embedded in-process state store (the default)."""

from __future__ import annotations


class MemoryStateStore:
    """Keeps everything in this process; always reachable."""

    name = "memory"

    def ping(self) -> None:
        """An in-process store always answers."""

    def close(self) -> None:
        """Nothing to release."""
