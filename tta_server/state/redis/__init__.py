"""The Redis state store, one module per concern.

- :mod:`.store`: :class:`RedisStateStore`, composing the parts below;
- :mod:`.keys`: key layout, hash tags and record encoding;
- :mod:`.scripts`: the Lua scripts (compare-and-set, load, create) and the calls running them;
- :mod:`.circuit`: the circuit breaker that stops calls from waiting on an unreachable Redis;
- :mod:`.cache`: the hot cache of stream states (LRU, pending write-behind and outage steps);
- :mod:`.indexes`: the listing indexes and the stream count served from memory;
- :mod:`.flusher`: the background thread (probe, catch-up, write-behind flush, count refresh).
"""

from tta_server.state.redis.store import RedisStateStore, redacted_location

__all__ = ["RedisStateStore", "redacted_location"]
