"""Build the redis-py client a store URL names: one server, or a Redis Cluster.

``redis://`` and ``rediss://`` name one server (redis-py's ``Redis``). ``redis+cluster://`` and
``rediss+cluster://`` name seed nodes of a Redis Cluster, ``host:port`` separated by commas
(any one live node is enough: the client discovers the others and follows slot moves and
failovers), and select redis-py's ``RedisCluster``. The store uses both through the same
commands: every key of one stream shares a hash tag, so each script and transaction stays in
one slot.

Why the cluster client gets its own retry policy: after a master dies the cluster needs about
``cluster-node-timeout`` plus an election to promote its replica. redis-py retries a failed
command with a fresh slot table; a short, bounded backoff lets a call ride out a quick failover
without ever waiting longer than a few socket timeouts (the circuit breaker takes over after).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterError, RedisClusterException, TryAgainError
from redis.retry import Retry

from tta_server.state.redis.circuit import OUTAGE_ERRORS

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
STANDALONE_SCHEMES = ("redis://", "rediss://", "unix://")
STORE_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)
"""Every error a call of the store can raise from redis-py: the cluster client raises
``RedisClusterException`` (no node reachable, a slot not covered), which is not a ``RedisError``."""
CLUSTER_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    *OUTAGE_ERRORS,
    RedisClusterException,
    ClusterError,
    TryAgainError,
)
"""On a cluster these also mean "not reachable now" (CLUSTERDOWN, MASTERDOWN, TRYAGAIN during a
failover or resharding, no reachable node): they open the circuit like a refused connection."""
CLUSTER_RETRIES = 4
"""Cluster-level attempts per command (each one re-reads the slot table after a connection error)."""


def is_cluster_url(url: str) -> bool:
    """True for ``redis+cluster://`` and ``rediss+cluster://`` URLs."""
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def outage_errors(url: str) -> tuple[type[BaseException], ...]:
    """The errors that open the circuit for a store on ``url``."""
    return CLUSTER_OUTAGE_ERRORS if is_cluster_url(url) else OUTAGE_ERRORS


def is_redis_url(url: str) -> bool:
    """True for every URL this module can connect to."""
    return url.startswith(STANDALONE_SCHEMES) or is_cluster_url(url)


@dataclass(frozen=True)
class ClusterURL:
    """A parsed cluster URL: seed nodes plus the single-node URL redis-py parses options from."""

    seeds: tuple[tuple[str, int], ...]
    first_node_url: str

    @property
    def where(self) -> str:
        """The seed nodes as ``host:port,...``, without credentials (for logs and errors)."""
        return ",".join(f"{host}:{port}" for host, port in self.seeds)


def parse_cluster_url(url: str) -> ClusterURL:
    """Split ``redis+cluster://[user:password@]h1:p1,h2:p2[/0][?options]``; ValueError without credentials."""
    scheme, _, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme)
    if plain is None:
        raise ValueError(f"not a Redis Cluster URL scheme: {scheme!r}")
    netloc, slash, tail = rest.partition("/")
    if "?" in netloc:  # no path: options follow the hosts directly
        netloc, _, query = netloc.partition("?")
        tail, slash = "?" + query, "/"
    credentials, at, hosts = netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"Redis Cluster seed {part.strip()!r} is not host:port (in {hosts!r})")
        seeds.append((host.strip("[]"), int(port)))
    path = tail.split("?", 1)[0]
    if path not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0, the URL names {path!r}")
    first = f"{plain}://{credentials}{at}{seeds[0][0]}:{seeds[0][1]}{slash}{tail}"
    return ClusterURL(tuple(seeds), first)


def open_client(url: str, *, max_connections: int, socket_timeout: float, client_name: str) -> redis.Redis:
    """The client for ``url``: ``Redis`` for one server, ``RedisCluster`` for a cluster URL.

    The return type is ``redis.Redis`` for callers: ``RedisCluster`` implements every command
    the store sends (keyed commands, scripts, single-slot transactions, pipelines) the same way.
    """
    common: dict[str, Any] = {
        "max_connections": max_connections,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "health_check_interval": 30,
        "client_name": client_name,
    }
    if not is_cluster_url(url):
        # One retry per command hides a pooled connection that died (Redis restarted); the
        # write token makes retried writes safe. The price: a hung server costs the call that
        # opens the circuit 2 x socket_timeout.
        return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), **common)
    parsed = parse_cluster_url(url)
    cluster = RedisCluster(
        url=parsed.first_node_url,
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.seeds[1:]],  # type: ignore[no-untyped-call]
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), CLUSTER_RETRIES),
        **common,
    )
    return cluster  # type: ignore[return-value]


def location(client: redis.Redis, url: str) -> str:
    """``host:port/db`` of one server (or its socket path), or the cluster's seed nodes; never credentials."""
    if is_cluster_url(url):
        return f"cluster {parse_cluster_url(url).where}"
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def standalone_url_check(url: str) -> None:
    """Raise ValueError (without credentials) unless ``url`` is a URL :func:`open_client` accepts."""
    if not is_redis_url(url):
        shown = url.rsplit("@", maxsplit=1)[-1]
        raise ValueError(f"not a Redis URL: {shown!r} (use redis://, rediss://, redis+cluster:// or rediss+cluster://)")
    if is_cluster_url(url):
        parse_cluster_url(url)
    else:
        urlsplit(url)
