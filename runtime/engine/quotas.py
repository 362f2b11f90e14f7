"""Per-principal quotas: how much one tenant may take of a shared deployment.

Counts live in Redis, so every node enforces the same numbers. Two kinds:

* **totals** (actors created): read with the checkpoint when an actor is activated
  with none, and counted in the round trip of its first commit. The check and the
  count are not one atomic step (the count lives outside the actor's shard, so no
  script may touch both), so concurrent creations may pass a quota by at most the
  number of creations in flight, and a first commit refused by fencing still
  counts. Both err on the tenant's side of nothing and keep the commit path short.
* **rates** (events per second): one counter per principal and second, shared by
  the nodes, expiring after two seconds.

Going over answers :class:`~troth.core.errors.QuotaExceeded` (429 with Retry-After) and
changes nothing.
"""

from __future__ import annotations

import time

import redis

from troth.core.config import QuotaConfig
from troth.core.errors import QuotaExceeded
from troth.core.keys import KeySpace


class Quotas:
    def __init__(self, client: redis.Redis, keys: KeySpace, config: QuotaConfig) -> None:
        self.client = client
        self.keys = keys
        self.config = config

    def check_new_actor(self, owner: str, created: int) -> None:
        """Refuse a new actor of ``owner`` once it created its quota of actors
        (``created``, read with the actor's checkpoint in one round trip)."""
        limit = self.config.of(owner).actors
        if created >= limit:
            raise QuotaExceeded(f"principal {owner!r} has created its quota of {limit} actors", 60)

    def actors_created(self, owner: str) -> int:
        return int(self.client.hget(self.keys.quota(owner), "actors") or 0)

    def check_rate(self, principal: str, what: str = "events") -> None:
        """Count one event of ``principal`` in this second; refuse it over the rate."""
        limit = self.config.of(principal).events_per_second
        key = self.keys.rate(principal, int(time.time()))
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 2)
        count = int(pipe.execute()[0])
        if count > limit:
            raise QuotaExceeded(f"principal {principal!r} is over {limit} {what} per second")
