"""An in-memory delay queue of work items keyed by shard.

The timer scheduler and the outbox dispatcher both keep, for the shards this node
owns, a heap of "do X at time T". Redis stays the source of truth: the heap is
filled when a shard is claimed and after each commit, and emptied of a shard's
items when the shard is lost. Items are (due, shard, key, token); a newer push of
the same key supersedes the older one.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from troth.core.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)


class DueQueue:
    def __init__(
        self, name: str, on_due: Callable[[int, str, Any], None], clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.name = name
        self.on_due = on_due
        self.clock = clock
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
    def handing_over(self) -> bool:
        """Whether an item left the queue and its handler has not returned yet."""
        with self._cond:
            return self._handing > 0

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

    def _run(self) -> None:
        while True:
            with self._cond:
                item = None
                while item is None:
                    if self._stopped:
                        return
                    now = self.clock.now_ms()
                    while self._heap:
                        due, tie, shard, key = self._heap[0]
                        if not self._live(key, tie):
                            heapq.heappop(self._heap)  # superseded or dropped
                            continue
                        break
                    if not self._heap:
                        self._cond.wait()
                        continue
                    due, tie, shard, key = self._heap[0]
                    if due > now:
                        self._cond.wait(timeout=min((due - now) / 1000, 1.0))
                        continue
                    heapq.heappop(self._heap)
                    _, token, _ = self._tokens.pop(key)
                    item = (shard, key, token)
                    self._handing += 1
            try:
                self.on_due(*item)
            except Exception:
                log.exception("%s: handling %s failed", self.name, item[1])
            finally:
                with self._cond:
                    self._handing -= 1
