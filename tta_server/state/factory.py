"""Build the state store named by the settings' ``store_url``."""

from __future__ import annotations

from tta_server.metrics import Metrics
from tta_server.settings import Settings
from tta_server.state.base import StateStore
from tta_server.state.memory import MemoryStateStore
from tta_server.state.write_policy import WritePolicy


def open_store(settings: Settings, metrics: Metrics | None = None, device: str | None = None) -> StateStore:
    """A store for ``settings.store_url`` (``memory://``, ``redis://``, ``rediss://``).

    ``metrics`` lets the Redis store count failed writes and report pending states;
    ``device`` is where loaded states' tensors are placed (the model worker's device).
    """
    url = settings.store_url
    if url.startswith("memory://"):
        return MemoryStateStore(settings.memory_max_streams, settings.memory_ttl_s)
    if url.startswith(("redis://", "rediss://")):
        from tta_server.state.redis_store import RedisStateStore

        return RedisStateStore(
            url,
            key_prefix=settings.redis_key_prefix,
            ttl_seconds=settings.redis_ttl_s,
            policy=WritePolicy(
                settings.redis_write_policy, settings.redis_flush_every_steps, settings.redis_flush_every_s
            ),
            cache_max_streams=settings.redis_cache_streams,
            max_connections=settings.redis_max_connections,
            socket_timeout=settings.redis_timeout_s,
            retry_interval=settings.redis_retry_s,
            device=device,
            metrics=metrics,
        )
    shown = url.rsplit("@", maxsplit=1)[-1]
    raise ValueError(f"unsupported state store URL {shown!r}; use memory://, redis:// or rediss://")
