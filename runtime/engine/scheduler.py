"""The timer scheduler: fires durable timers of the shards this node owns.

Timers live in Redis (``P:{sN}:tm`` and ``P:{sN}:td``), written by the commits
of the timers plugin. This scheduler only decides *when* to send the firing
message; *exactly once* comes from the commit, which deletes the timer in the
same atomic step as its handler's state and refuses a firing whose timer no
longer exists with the same id. A firing refused for a transient reason
(the actor moving, Redis down) is retried a second later while this node still
owns the shard; otherwise the shard's new owner fires it.

Timers due together reach the node's event loop in one hop (see
:mod:`troth.engine.duequeue`) and wait there in due order; at most
``MAX_IN_FLIGHT`` firings are handed to the engine at once. Only the timers due
within the due queue's window are in memory; the rest are read from Redis as the
window moves on (a retained commitment's retire timer, due in a day, costs no
memory until then).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import redis

from troth.core.clock import SYSTEM_CLOCK, Clock
from troth.core.errors import RetryableError
from troth.core.keys import KeySpace
from troth.core.records import TimerRecord
from troth.engine.due_reads import CHUNK, due_between, earliest_after
from troth.engine.duequeue import Due, DueQueue, Stored

log = logging.getLogger(__name__)

#: How late a timer may fire to travel to the loop with those due just after it: at
#: 1,000 timers a second spread over time, 100 hops between threads instead of 1,000.
TIMER_COALESCE_MS = 10

RETRY_MS = 1000
#: Firings handed to the engine and not yet committed, at most. When many timers fall
#: due at once, the rest wait: their transactions, and the deliveries they cause,
#: then flow through the node in step instead of all firings first.
MAX_IN_FLIGHT = 256

#: Sends a timer's firing message on the node's loop; the future resolves after its
#: commit (or raises why it was refused).
Fire = Callable[[int, TimerRecord], "asyncio.Future[Any]"]


class TimerScheduler:
    def __init__(
        self,
        client: redis.Redis,
        keys: KeySpace,
        fire: Fire,
        owns: Callable[[int], bool],
        loop: asyncio.AbstractEventLoop,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.clock = clock
        self.client = client
        self.keys = keys
        self.fire = fire
        self.owns = owns
        self.loop = loop
        self.queue = DueQueue("timers", self._due, clock, coalesce_ms=TIMER_COALESCE_MS, store=self)
        self._lock = threading.Lock()
        self._waiting: deque[tuple[int, str, TimerRecord]] = deque()  # on the loop
        self._handed = 0  # items between the queue's thread and the loop
        self._firing = 0

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()

    def __len__(self) -> int:
        return len(self.queue)

    def load_shards(self, shards: list[int]) -> None:
        self.queue.claim(shards)

    def read(self, shards: list[int], after_ms: int | None, until_ms: int) -> Stored:
        """The timers of ``shards`` due in ``(after_ms, until_ms]`` (the due queue's
        :class:`~troth.engine.duequeue.Store`)."""
        found = due_between(
            self.client, [self.keys.shard(s).timers for s in shards], after_ms, until_ms
        )
        pipe = self.client.pipeline(transaction=False)
        asked: list[int] = []
        for shard, members in zip(shards, found, strict=True):
            for i in range(0, len(members), CHUNK):
                pipe.hmget(
                    self.keys.shard(shard).timer_data, [m for m, _ in members[i : i + CHUNK]]
                )
                asked.append(shard)
        timers: Stored = []
        for shard, values in zip(asked, pipe.execute() if asked else [], strict=True):
            for raw in values:
                if raw is not None:  # fired or cancelled since
                    timer = TimerRecord.decode(raw)
                    timers.append((timer.due_ms, shard, timer.key, timer))
        return timers

    def earliest(self, shards: list[int], after_ms: int) -> int | None:
        return earliest_after(self.client, [self.keys.shard(s).timers for s in shards], after_ms)

    def drop_shards(self, shards: set[int]) -> None:
        self.queue.drop_shards(shards)

    def add(self, shard: int, timer: TimerRecord) -> None:
        self.queue.push(timer.due_ms, shard, timer.key, timer)

    def cancel(self, key: str) -> None:
        self.queue.discard(key)

    @property
    def in_flight(self) -> int:
        """Timers due and not yet fired: on their way to the loop, waiting there, or
        handed to the engine with their transaction not ended yet."""
        with self._lock:
            return self._handed + len(self._waiting) + self._firing + self.queue.handing_over

    def _due(self, items: Due) -> None:
        """From the due queue's thread: hand the due timers to the loop."""
        with self._lock:
            self._handed += len(items)
        try:
            self.loop.call_soon_threadsafe(self._take, items)
        except RuntimeError:  # the loop is closed: the node is stopping; Redis keeps them
            with self._lock:
                self._handed -= len(items)

    def _take(self, items: Due) -> None:
        with self._lock:
            self._handed -= len(items)
            self._waiting.extend(items)
        self._start()

    def _start(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or self._firing >= MAX_IN_FLIGHT:
                    return
                shard, key, timer = self._waiting.popleft()
                self._firing += 1
            try:
                fired = self.fire(shard, timer)
            except Exception as exc:  # refused before it was queued (shard moved, full)
                fired = self.loop.create_future()
                fired.set_exception(exc)
            fired.add_done_callback(partial(self._done, shard, key, timer))

    def _done(self, shard: int, key: str, timer: TimerRecord, fired: asyncio.Future[Any]) -> None:
        exc = None if fired.cancelled() else fired.exception()
        if isinstance(exc, RetryableError) and self.owns(shard):
            log.info("timer %r of %s deferred: %s", timer.name, timer.actor, exc)
            self.queue.push(self.clock.now_ms() + RETRY_MS, shard, key, timer)
        with self._lock:
            self._firing -= 1
        self._start()
