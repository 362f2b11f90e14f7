"""The Redis clients of a node: bounded pools, bounded waits, one retry policy, and
the same code on one Redis or on Redis Cluster.

A Redis that is down or paused must become a prompt error (503 to a caller), never
a hang, and a burst of activity must queue for a connection rather than open
thousands: every pool here has a size and every wait a deadline.

**Cluster mode** is chosen by the URL (``redis+cluster://host:port``, or
``rediss+cluster://`` with TLS) or found by asking a plain ``redis://`` server
(``INFO cluster``). The clients are then redis-py's cluster clients: every key goes
to the master that owns its slot, and a pipeline is split by master. troth's key
layout keeps everything one Lua script touches in one slot (see
:mod:`troth.core.keys`), so no script ever crosses masters.
"""

from __future__ import annotations

from typing import TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

__all__ = [
    "REDIS_MAX_CONNECTIONS",
    "AsyncClient",
    "SyncClient",
    "async_redis_client",
    "cluster_url",
    "discovered_client",
    "redis_client",
]

#: Connections one node opens to Redis (to each master of a cluster) at most.
REDIS_MAX_CONNECTIONS = 64

#: The node's clients: one Redis, or a cluster (same commands, routed by key slot).
SyncClient: TypeAlias = redis.Redis | RedisCluster
AsyncClient: TypeAlias = aredis.Redis | AsyncRedisCluster

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str) -> str | None:
    """The plain URL of a seed node if ``url`` names a cluster, else None.

    A ``redis+cluster://`` URL names one; a plain ``redis://`` URL names one when the
    server says ``cluster_enabled:1`` (one round trip, made once when a node starts).
    """
    seed = _cluster_scheme(url)
    if seed is not None:
        return seed
    if urlsplit(url).scheme not in ("redis", "rediss"):
        return None  # a Unix socket: never a cluster
    probe = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        enabled = probe.info("cluster").get("cluster_enabled", 0)
    except redis.ResponseError:  # a server without the section (or a proxy)
        return None
    finally:
        probe.close()
    return url if int(enabled) == 1 else None


def _retry() -> Retry:
    """One immediate retry of a dropped connection; none of a timeout, which would only
    double the wait (redis-py's default retries three times with backoff)."""
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def redis_client(
    url: str,
    timeout: float = 5.0,
    max_connections: int = REDIS_MAX_CONNECTIONS,
    cluster: str | None = None,
) -> SyncClient:
    """A client whose pool is bounded (a thousand activating actors share 64
    connections) and whose every wait, for a connection or for a reply, ends after
    ``timeout`` seconds: a Redis that is down or paused becomes a 503, not a hang.

    ``cluster`` (from :func:`cluster_url`) makes it a cluster client; a ``+cluster``
    URL is recognised without it."""
    seed = cluster or _cluster_scheme(url)
    if seed is not None:
        return RedisCluster.from_url(
            seed,
            protocol=2,  # the replies troth parses are RESP2's, as on a single Redis
            max_connections=max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        retry=_retry(),
    )
    return redis.Redis.from_pool(pool)  # closing the client closes its connections


def discovered_client(url: str, timeout: float = 5.0) -> SyncClient:
    """:func:`redis_client` for ``url``, a cluster client when the server says it is in
    a cluster (for the operator commands and tools, which are given any URL)."""
    return redis_client(url, timeout, cluster=cluster_url(url))


def async_redis_client(
    url: str, timeout: float, max_connections: int = 32, cluster: str | None = None
) -> AsyncClient:
    """The engine's client. Replies have no per-read timeout here: the
    :class:`~troth.core.batcher.Batcher` bounds each round trip as a whole."""
    seed = cluster or _cluster_scheme(url)
    if seed is not None:
        return AsyncRedisCluster.from_url(
            seed,
            protocol=2,  # the batcher parses RESP2 replies (redis-py would pick RESP3)
            max_connections=max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
    pool = aredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=None,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        retry=_retry(),
    )
    return aredis.Redis.from_pool(pool)  # closing the client closes its connections


def _cluster_scheme(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme in _CLUSTER_SCHEMES:
        return urlunsplit(parts._replace(scheme=_CLUSTER_SCHEMES[parts.scheme]))
    return None
