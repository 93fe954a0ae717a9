"""The state store interface every backend implements (memory by default, Redis for replicas).

A store keeps, per stream: the registration (:class:`StreamRecord`, written once) and the
latest adapted state (:class:`StoredState`) with a *version*. Every state write names the
version it was based on; a store refuses a stale write with :class:`VersionConflictError`
instead of silently overwriting a newer state (compare-and-set).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from adapters.base import StreamState


class StoreError(Exception):
    """Base of state store errors."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached; readiness reports it and store-bound calls answer 503."""


class StreamExistsError(StoreError):
    """A stream with this id already exists for this tenant (HTTP 409)."""


class StreamNotFoundError(StoreError):
    """No such stream for this tenant (HTTP 404)."""


class VersionConflictError(StoreError):
    """A state write was based on an older version than the stored one (lost-update guard)."""


class StreamKey(NamedTuple):
    """A stream is identified by its tenant and its id; tenants never see each other's streams.

    A named tuple rather than a frozen dataclass: a key is hashed and compared a dozen times per
    request (queues, store, drift windows), and a tuple does both in C.
    """

    tenant: str
    stream_id: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.stream_id}"


@dataclass(frozen=True)
class StreamRecord:
    """What a client registered: model, method, validated config, seed and free metadata."""

    key: StreamKey
    model: str
    method: str
    config: dict[str, Any]
    seed: int
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)


class StoredState(NamedTuple):
    """A stream's latest state, its version, running counters and the time of the write."""

    state: StreamState
    version: int
    samples_seen: int
    updated_at: float


@dataclass(frozen=True)
class StateSummary:
    """What a stream description shows of its state, without the tensors.

    Listing streams must not move every stream's state (CEMA's replay buffer alone is tens of
    megabytes) across the network; a summary is a few numbers. ``state_bytes`` is the size the
    store holds: the tensors' bytes in memory, the serialized blob in Redis.
    """

    version: int
    steps: int
    samples_seen: int
    updated_at: float
    state_bytes: int

    @classmethod
    def of(cls, stored: StoredState) -> StateSummary:
        return cls(
            stored.version, stored.state.meta.step, stored.samples_seen, stored.updated_at, stored.state.nbytes()
        )


class StateStore(Protocol):
    """Where stream registrations and states live."""

    name: str
    in_process: bool
    """True when every call is a short in-memory operation that never waits on I/O: the service
    then reads registrations on the event loop instead of paying a thread hop per request."""

    def ping(self) -> None:
        """Return when the store answers; raise :class:`StoreUnavailableError` otherwise."""

    def create_stream(self, record: StreamRecord) -> None:
        """Register a new stream; :class:`StreamExistsError` if the key is taken."""

    def get_stream(self, key: StreamKey) -> StreamRecord:
        """The registration of ``key``; :class:`StreamNotFoundError` if absent."""

    def list_streams(self, tenant: str | None, offset: int, limit: int) -> tuple[list[StreamRecord], int]:
        """A page of registrations (all tenants when ``tenant`` is None) and the total count."""

    def delete_stream(self, key: StreamKey) -> None:
        """Remove the registration and the state; :class:`StreamNotFoundError` if absent."""

    def load_state(self, key: StreamKey) -> StoredState | None:
        """The latest state, or None before the first write."""

    def save_state(self, key: StreamKey, state: StreamState, expected_version: int, samples_seen: int) -> int:
        """Write ``state`` if the stored version equals ``expected_version``; return the new version."""

    def state_summaries(self, keys: Sequence[StreamKey]) -> dict[StreamKey, StateSummary]:
        """Summaries of the newest states of ``keys`` (one round trip); streams without a state are absent."""

    def count(self) -> int:
        """Registered streams (all tenants)."""

    def close(self) -> None:
        """Release connections and flush pending writes."""
