"""The state store interface every backend implements (memory today, Redis for replicas)."""

from __future__ import annotations

from typing import Protocol


class StoreUnavailableError(RuntimeError):
    """The store cannot be reached; readiness reports it and store-bound calls answer 503."""


class StateStore(Protocol):
    """Where stream registrations and states live."""

    name: str

    def ping(self) -> None:
        """Return when the store answers; raise :class:`StoreUnavailableError` otherwise."""

    def close(self) -> None:
        """Release connections and flush pending writes."""
