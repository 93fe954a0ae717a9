"""Key layout and record encoding of the Redis state store.

Every key of one stream carries the same hash tag ``{<tenant>/<stream_id>}`` so that, in a
Redis Cluster, a stream's registration and state live in one slot and the compare-and-set
script (which touches both) is legal. The listing indexes share a second tag, ``{idx}``, so
that adding a stream to the all-tenants and the per-tenant index is one atomic MULTI in both
standalone and cluster deployments::

    <prefix>:{<tenant>/<stream>}:rec     string  JSON registration (StreamRecord)
    <prefix>:{<tenant>/<stream>}:state   hash    v=version b=safetensors bytes n=samples seen
                                                 u=updated_at s=step w=token of the last write
    <prefix>:{idx}:all                   zset    member "<tenant>/<stream>", score created_at
    <prefix>:{idx}:t:<tenant>            zset    the same, one tenant
    <prefix>:{idx}:exp                   zset    idle-TTL hints: member -> earliest expiry time

On a Redis Cluster (``KeyLayout(cluster=True)``) each tenant's index gets a hash tag of its own,
``{idx:t:<tenant>}``, so tenants' listings spread over the cluster's shards instead of all
landing on the ``{idx}`` slot; ``{idx}:all`` and ``{idx}:exp`` still share one slot, and the
tenant index is written next to them, never in the same MULTI (no command spans two slots).
One server keeps the layout above, byte for byte::

    <prefix>:{idx:t:<tenant>}:t          zset    cluster only: one tenant's index, own slot

Tenant and stream id are percent-encoded (``/``, ``{``, ``}``, ``:`` and ``%`` never appear
raw), so ``a/b`` + ``c`` and ``a`` + ``b/c`` can never collide and a stray brace can never
change the hash tag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from tta_server.state.base import StreamKey, StreamRecord


def member_of(key: StreamKey) -> str:
    """The index member (and hash tag body) of ``key``: both parts percent-encoded."""
    return f"{quote(key.tenant, safe='')}/{quote(key.stream_id, safe='')}"


def key_of_member(member: str | bytes) -> StreamKey:
    """Inverse of :func:`member_of`; raises ValueError for a member not written by this store."""
    text = member.decode() if isinstance(member, bytes) else member
    tenant, sep, stream_id = text.partition("/")
    if not sep or "/" in stream_id:
        raise ValueError(f"malformed stream index member {text!r}")
    return StreamKey(unquote(tenant), unquote(stream_id))


@dataclass(frozen=True)
class KeyLayout:
    """Names of every Redis key the store uses, under one configurable prefix."""

    prefix: str = "tta"
    cluster: bool = False
    """True on a Redis Cluster: tenant indexes carry their own hash tag (see the module doc)."""

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "{} \n"):
            raise ValueError(
                f"Redis key prefix {self.prefix!r} must be non-empty without braces or spaces "
                "(braces would override the per-stream hash tag)"
            )

    def record(self, key: StreamKey) -> str:
        return f"{self.prefix}:{{{member_of(key)}}}:rec"

    def state(self, key: StreamKey) -> str:
        return f"{self.prefix}:{{{member_of(key)}}}:state"

    @property
    def all_index(self) -> str:
        return f"{self.prefix}:{{idx}}:all"

    def tenant_index(self, tenant: str) -> str:
        if self.cluster:
            return f"{self.prefix}:{{idx:t:{quote(tenant, safe='')}}}:t"
        return f"{self.prefix}:{{idx}}:t:{quote(tenant, safe='')}"

    @property
    def tenant_index_shares_slot(self) -> bool:
        """True when the tenant indexes live in the ``{idx}`` slot (one server), so one MULTI covers all indexes."""
        return not self.cluster

    @property
    def expiry_index(self) -> str:
        return f"{self.prefix}:{{idx}}:exp"

    def pattern(self) -> str:
        """A SCAN/KEYS pattern matching every key of this layout (tests and clean-up)."""
        return f"{self.prefix}:*"


def record_to_json(record: StreamRecord) -> bytes:
    """The registration as compact JSON (never pickle: Redis content must stay inert data)."""
    body: dict[str, Any] = {
        "tenant": record.key.tenant,
        "stream_id": record.key.stream_id,
        "model": record.model,
        "method": record.method,
        "config": record.config,
        "seed": record.seed,
        "metadata": record.metadata,
        "created_at": record.created_at,
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def record_from_json(raw: bytes | str) -> StreamRecord:
    """Inverse of :func:`record_to_json`; raises ValueError naming the missing field."""
    try:
        body = json.loads(raw)
        return StreamRecord(
            key=StreamKey(str(body["tenant"]), str(body["stream_id"])),
            model=str(body["model"]),
            method=str(body["method"]),
            config=dict(body["config"]),
            seed=int(body["seed"]),
            metadata={str(k): str(v) for k, v in dict(body.get("metadata") or {}).items()},
            created_at=float(body["created_at"]),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed stream registration in Redis: {exc!r}") from exc
