"""An in-memory delay queue of work items keyed by shard.

The timer scheduler and the outbox dispatcher both keep, for the shards this node
owns, a heap of "do X at time T". Redis stays the source of truth: the heap is
filled when a shard is claimed and after each commit, and emptied of a shard's
items when the shard is lost. Items are (due, shard, key, token); a newer push of
the same key supersedes the older one.

Everything due is handed over at once (up to ``HAND_OVER_MAX`` items a call), so
that a herd of 10,000 timers due in the same second costs a few hops to the node's
event loop, not one each. With ``coalesce_ms`` the queue also waits that long after
its earliest item falls due, so that items due at nearby times travel together: a
stream of work each delayed by a second (the outbox's index updates) then wakes the
thread and the loop ``1000 / coalesce_ms`` times a second, not once per item.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from troth.core.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

HAND_OVER_MAX = 1024

#: What a queue hands over: (shard, key, token) of items now due.
Due = list[tuple[int, str, Any]]


class DueQueue:
    def __init__(
        self,
        name: str,
        on_due: Callable[[Due], None],
        clock: Clock = SYSTEM_CLOCK,
        coalesce_ms: int = 0,
    ) -> None:
        self.name = name
        self.on_due = on_due
        self.clock = clock
        #: How late an item may be handed over, to travel with those due soon after it.
        self.coalesce_ms = coalesce_ms
        self._gather_until: float | None = None  # monotonic end of a coalescing pause
        self._heap: list[tuple[int, int, int, str]] = []
        self._tokens: dict[str, tuple[int, Any, int]] = {}  # key -> (shard, token, tie)
        self._tie = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._handing = 0
        self._thread = threading.Thread(target=self._run, name=f"troth-{name}", daemon=True)
        clock.on_jump(self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def __len__(self) -> int:
        with self._cond:
            return len(self._tokens)

    @property
    def handing_over(self) -> int:
        """Items that left the queue and whose handler has not returned yet."""
        with self._cond:
            return self._handing

    def next_due(self) -> int | None:
        """The earliest due time of a live item (ms), or None when empty."""
        with self._cond:
            live = [due for due, tie, _, key in self._heap if self._live(key, tie)]
            return min(live, default=None)

    def _live(self, key: str, tie: int) -> bool:
        current = self._tokens.get(key)
        return current is not None and current[2] == tie

    def push(self, due_ms: int, shard: int, key: str, token: Any = None) -> None:
        with self._cond:
            tie = next(self._tie)
            self._tokens[key] = (shard, token, tie)
            heapq.heappush(self._heap, (due_ms, tie, shard, key))
            if self._heap[0][1] == tie:
                self._cond.notify()

    def discard(self, key: str) -> None:
        with self._cond:
            self._tokens.pop(key, None)

    def drop_shards(self, shards: set[int]) -> None:
        with self._cond:
            for key in [k for k, (s, _, _) in self._tokens.items() if s in shards]:
                del self._tokens[key]

    def _take_due(self, now: int) -> Due:
        """Pop every live item due at ``now`` (at most ``HAND_OVER_MAX``); call with the
        lock."""
        items: Due = []
        while self._heap and len(items) < HAND_OVER_MAX:
            due, tie, shard, key = self._heap[0]
            if not self._live(key, tie):
                heapq.heappop(self._heap)  # superseded or dropped
            elif due <= now:
                heapq.heappop(self._heap)
                _, token, _ = self._tokens.pop(key)
                items.append((shard, key, token))
            else:
                break
        return items

    def _next(self) -> Due | float | None:
        """With the lock: the items to hand over now, else how long to wait (seconds;
        None: until something is pushed). The coalescing pause is real time, so that a
        test's clock that stands still does not hold items back for ever."""
        while self._heap and not self._live(self._heap[0][3], self._heap[0][1]):
            heapq.heappop(self._heap)  # superseded or dropped
        if not self._heap:
            return None
        now = self.clock.now_ms()
        early = self._heap[0][0] - now
        if early > 0:
            return min(early / 1000, 1.0)
        if self.coalesce_ms:
            real = time.monotonic()
            if self._gather_until is None:
                self._gather_until = real + self.coalesce_ms / 1000
            if real < self._gather_until:
                return self._gather_until - real
            self._gather_until = None
        return self._take_due(now)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    found = self._next()
                    if isinstance(found, list):
                        items = found
                        break
                    self._cond.wait(timeout=found)
                self._handing += len(items)
            try:
                self.on_due(items)
            except Exception:
                log.exception("%s: handing over %d items failed", self.name, len(items))
            finally:
                with self._cond:
                    self._handing -= len(items)
