"""Per-principal quotas: how much one tenant may take of a shared deployment.

Counts live in Redis, so every node enforces the same numbers. Two kinds:

* **totals** (actors created): checked before an actor's first commit and counted
  after it. The check and the count are not one atomic step, so concurrent
  creations may pass a quota by at most the number of creations in flight; a crash
  between a first commit and its count under-counts by one. Both are documented
  trade-offs that keep the quota off the commit path.
* **rates** (events per second): one counter per principal and second, shared by
  the nodes, expiring after two seconds.

Going over answers :class:`~troth.errors.QuotaExceeded` (429 with Retry-After) and
changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis

from .aio import Background
from .batcher import Batcher
from .config import QuotaConfig
from .errors import QuotaExceeded
from .keys import KeySpace

log = logging.getLogger(__name__)


class Quotas:
    def __init__(
        self, client: redis.Redis, batcher: Batcher, keys: KeySpace, config: QuotaConfig
    ) -> None:
        self.client = client
        self.batcher = batcher
        self.keys = keys
        self.config = config
        self._background = Background()

    async def check_new_actor(self, owner: str) -> None:
        """Refuse a new actor of ``owner`` once it created its quota of actors."""
        limit = self.config.of(owner).actors
        key = self.keys.quota(owner)
        (created,) = await self.batcher.run(lambda p: p.hget(key, "actors"))
        if isinstance(created, Exception):
            raise created
        if int(created or 0) >= limit:
            raise QuotaExceeded(f"principal {owner!r} has created its quota of {limit} actors", 60)

    def count_created(self, owner: str) -> None:
        """Count a new actor of ``owner`` (after its first commit; best effort)."""
        key = self.keys.quota(owner)
        task = self._background.spawn(self.batcher.run(lambda p: p.hincrby(key, "actors", 1)))
        task.add_done_callback(_log_failure)

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


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("counting a new actor failed: %s", task.exception())
