"""Build the state store named by a URL, from :class:`StoreOptions`.

The options are a plain dataclass of this package so that the state layer never imports the
server's settings (settings import the state layer: ``Settings.store_options()`` builds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tta_server.metrics import Metrics
from tta_server.state.base import StateStore, StreamKey
from tta_server.state.memory import EvictionReason, MemoryStateStore
from tta_server.state.write_policy import WriteMode, WritePolicy


@dataclass(frozen=True)
class StoreOptions:
    """Everything :func:`open_store` needs to build a store; defaults match the server's settings."""

    url: str = "memory://"
    memory_max_streams: int = 10_000
    memory_ttl_s: float | None = None
    redis_key_prefix: str = "tta"
    redis_ttl_s: float | None = None
    redis_write_policy: WriteMode = WriteMode.WRITE_THROUGH
    redis_flush_every_steps: int = 10
    redis_flush_every_s: float = 5.0
    redis_cache_streams: int = 1000
    redis_max_connections: int = 32
    redis_timeout_s: float = 2.0
    redis_retry_s: float = 1.0
    redis_wait_replicas: int = 0

    @property
    def write_policy(self) -> WritePolicy:
        return WritePolicy(self.redis_write_policy, self.redis_flush_every_steps, self.redis_flush_every_s)


class HasStoreOptions(Protocol):
    """Anything that can say which store to open (the server's ``Settings``)."""

    def store_options(self) -> StoreOptions: ...


def open_store(
    options: StoreOptions | HasStoreOptions, metrics: Metrics | None = None, device: str | None = None
) -> StateStore:
    """A store for ``options.url`` (``memory://``, ``redis://``, ``rediss://``, ``redis+cluster://``,
    ``rediss+cluster://``).

    ``metrics`` lets the Redis store count failed writes and report pending states, and the
    memory store count the streams it evicts (``tta_streams_evicted_total``);
    ``device`` is where loaded states' tensors are placed (the model worker's device).
    """
    if not isinstance(options, StoreOptions):
        options = options.store_options()
    url = options.url
    if url.startswith("memory://"):
        on_evict = None
        if metrics is not None:
            evicted = metrics.streams_evicted

            def on_evict(_: StreamKey, reason: EvictionReason) -> None:
                evicted.labels(reason).inc()

        return MemoryStateStore(options.memory_max_streams, options.memory_ttl_s, on_evict=on_evict)
    if url.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")):
        from tta_server.state.redis import RedisStateStore

        return RedisStateStore(
            url,
            key_prefix=options.redis_key_prefix,
            ttl_seconds=options.redis_ttl_s,
            policy=options.write_policy,
            cache_max_streams=options.redis_cache_streams,
            max_connections=options.redis_max_connections,
            socket_timeout=options.redis_timeout_s,
            retry_interval=options.redis_retry_s,
            wait_replicas=options.redis_wait_replicas,
            device=device,
            metrics=metrics,
        )
    shown = url.rsplit("@", maxsplit=1)[-1]
    raise ValueError(
        f"unsupported state store URL {shown!r}; use memory://, redis://, rediss://, redis+cluster:// or rediss+cluster://"
    )
