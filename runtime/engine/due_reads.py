"""Reading due work back from the shards' sorted sets (timers, the outbox queue), for
the due queues' windows (:class:`~troth.engine.duequeue.Store`).

A sorted set's score is its member's due time in ms. Reads are pipelined: one round
trip for all the shards a node claims or whose window moves on.
"""

from __future__ import annotations

import redis

#: Members of one shard's sorted set read by one command.
CHUNK = 1000


def due_between(
    client: redis.Redis, keys: list[str], after_ms: int | None, until_ms: int
) -> list[list[tuple[bytes, int]]]:
    """For each sorted set of ``keys``: its (member, due) pairs due in ``(after_ms,
    until_ms]`` (from the first with ``after_ms`` None), soonest first."""
    low = "-inf" if after_ms is None else f"({after_ms}"
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.zrangebyscore(key, low, until_ms, withscores=True)
    return [[(member, int(score)) for member, score in found] for found in pipe.execute()]


def earliest_after(client: redis.Redis, keys: list[str], after_ms: int) -> int | None:
    """The earliest due time after ``after_ms`` in any sorted set of ``keys``."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.zrangebyscore(key, f"({after_ms}", "+inf", start=0, num=1, withscores=True)
    return min((int(found[0][1]) for found in pipe.execute() if found), default=None)
