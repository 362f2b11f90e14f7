"""The Redis clients of a node: bounded pools, bounded waits, one retry policy.

A Redis that is down or paused must become a prompt error (503 to a caller), never
a hang, and a burst of activity must queue for a connection rather than open
thousands: every pool here has a size and every wait a deadline.
"""

from __future__ import annotations

import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["REDIS_MAX_CONNECTIONS", "async_redis_client", "redis_client"]


#: Connections one node opens to Redis at most; busy threads wait for a free one.
REDIS_MAX_CONNECTIONS = 64


def _retry() -> Retry:
    """One immediate retry of a dropped connection; none of a timeout, which would only
    double the wait (redis-py's default retries three times with backoff)."""
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def redis_client(
    url: str, timeout: float = 5.0, max_connections: int = REDIS_MAX_CONNECTIONS
) -> redis.Redis:
    """A client whose pool is bounded (a thousand activating actors share 64
    connections) and whose every wait, for a connection or for a reply, ends after
    ``timeout`` seconds: a Redis that is down or paused becomes a 503, not a hang."""
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


def async_redis_client(url: str, timeout: float, max_connections: int = 32) -> aredis.Redis:
    """The engine's client. Replies have no per-read timeout here: the
    :class:`Batcher` bounds each round trip as a whole (``timeout``)."""
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
