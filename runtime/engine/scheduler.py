"""The timer scheduler: fires durable timers of the shards this node owns.

Timers live in Redis (``P:{sN}:tm`` and ``P:{sN}:td``), written by the commits
of the timers plugin. This scheduler only decides *when* to send the firing
message; *exactly once* comes from the commit, which deletes the timer in the
same atomic step as its handler's state and refuses a firing whose timer no
longer exists with the same id. A firing refused for a transient reason
(the actor moving, Redis down) is retried a second later while this node still
owns the shard; otherwise the shard's new owner fires it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import redis

from troth.core.clock import SYSTEM_CLOCK, Clock
from troth.core.errors import RetryableError
from troth.core.keys import KeySpace
from troth.core.records import TimerRecord
from troth.engine.duequeue import DueQueue

log = logging.getLogger(__name__)

RETRY_MS = 1000
#: Firings handed to the engine and not yet committed, at most. When many timers fall
#: due at once, the rest wait in the queue: their transactions, and the deliveries they
#: cause, then flow through the node in step instead of all firings first.
MAX_IN_FLIGHT = 256


class TimerScheduler:
    def __init__(
        self,
        client: redis.Redis,
        keys: KeySpace,
        fire: Callable[[int, TimerRecord], Future[Any]],
        owns: Callable[[int], bool],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.clock = clock
        self.client = client
        self.keys = keys
        self.fire = fire
        self.owns = owns
        self.queue = DueQueue("timers", self._due, clock)
        self._firing = 0
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._stopped = False

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self._stopped = True
        self.queue.stop()

    def __len__(self) -> int:
        return len(self.queue)

    def load_shards(self, shards: list[int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for s in shards:
            pipe.hvals(self.keys.shard(s).timer_data)
        for shard, values in zip(shards, pipe.execute(), strict=True):
            for raw in values:
                self.add(shard, TimerRecord.decode(raw))

    def drop_shards(self, shards: set[int]) -> None:
        self.queue.drop_shards(shards)

    def add(self, shard: int, timer: TimerRecord) -> None:
        self.queue.push(timer.due_ms, shard, timer.key, timer)

    def cancel(self, key: str) -> None:
        self.queue.discard(key)

    @property
    def in_flight(self) -> int:
        """Firings handed to the engine whose transaction has not ended yet."""
        with self._lock:
            return self._firing + self.queue.handing_over

    def _due(self, shard: int, key: str, timer: TimerRecord) -> None:
        """From the due queue's thread, which waits here while the node is busy with
        ``MAX_IN_FLIGHT`` firings."""
        while not self._slots.acquire(timeout=0.5):
            if self._stopped:
                return  # the timer stays in Redis for the shard's next owner
        with self._lock:
            self._firing += 1

        def done(f: Future[Any]) -> None:
            try:
                exc = f.exception()
                if isinstance(exc, RetryableError) and self.owns(shard):
                    log.info("timer %r of %s deferred: %s", timer.name, timer.actor, exc)
                    retry_at = self.clock.now_ms() + RETRY_MS
                    self.queue.push(retry_at, shard, key, timer)
            finally:
                with self._lock:
                    self._firing -= 1
                self._slots.release()

        try:
            fired = self.fire(shard, timer)
        except BaseException:
            with self._lock:
                self._firing -= 1
            self._slots.release()
            raise
        fired.add_done_callback(done)
