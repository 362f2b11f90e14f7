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

**A window, not everything.** A queue given a :class:`Store` holds only the items
due within the next ``HORIZON_MS`` (and those overdue): claiming a shard reads only
those, and a push due later is not kept (its commit stored it). When less than half
the window is left, the queue's thread reads the next stretch of due times from the
store. A node's memory and the time it takes to claim a shard thus follow the work
due in the next two minutes, not every timer and delivery promised for next month
(a retained commitment's retire timer, an armed delivery due in a year).

What holds across a window's reads: an item the store held when its stretch was
read is handed over (once per read; its consumer's commit makes the effect happen
once); a push that arrives while a read is under way wins over the read's copy of
the same key, which may be older; and a push due beyond the window takes the key's
older item out, so that no stale copy is attempted in place of the stored one.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from troth.core.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

HAND_OVER_MAX = 1024
#: How far ahead a queue with a store holds items; it reads the next stretch when
#: less than half of it is left.
HORIZON_MS = 120_000
#: After a failed read, the window is read again this much later.
RETRY_SECONDS = 1.0

#: What a queue hands over: (shard, key, token) of items now due.
Due = list[tuple[int, str, Any]]
#: What a store reads back: (due ms, shard, key, token).
Stored = list[tuple[int, int, str, Any]]


class Store(Protocol):
    """Where a queue's items live for good (Redis), read back by due time."""

    def read(self, shards: list[int], after_ms: int | None, until_ms: int) -> Stored:
        """The items of ``shards`` due in ``(after_ms, until_ms]`` (from the first
        with ``after_ms`` None)."""
        ...

    def earliest(self, shards: list[int], after_ms: int) -> int | None:
        """The earliest due time after ``after_ms`` of an item of ``shards``, or None."""
        ...


class DueQueue:
    def __init__(
        self,
        name: str,
        on_due: Callable[[Due], None],
        clock: Clock = SYSTEM_CLOCK,
        coalesce_ms: int = 0,
        store: Store | None = None,
        horizon_ms: int = HORIZON_MS,
    ) -> None:
        """Without ``store`` the queue holds every item pushed (no window)."""
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
        self.store = store
        self.horizon_ms = horizon_ms
        #: The end of the window: items due later are not held (with a store).
        self._until = clock.now_ms() + horizon_ms
        self._shards: set[int] = set()  # those claimed: a read covers them
        self._reading = threading.Lock()  # one read of the store at a time
        self._read_after = 0.0  # monotonic time before which no read is retried
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

    def next_due(self, beyond_window: bool = True) -> int | None:
        """The earliest due time of a live item (ms), or None when empty; with a
        store and ``beyond_window``, of the stored items beyond the window too (a read
        of every claimed shard: for test kits that jump to the next due time)."""
        with self._cond:
            live = [due for due, tie, _, key in self._heap if self._live(key, tie)]
            until, shards = self._until, sorted(self._shards)
        if beyond_window and self.store is not None and shards:
            later = self.store.earliest(shards, until)
            if later is not None:
                live.append(later)
        return min(live, default=None)

    @property
    def reading_due(self) -> bool:
        """Whether the window has to move on (a read is due or under way): items due
        now may still be in the store only."""
        if self.store is None:
            return False
        with self._cond:
            return self._read_is_due() or self._reading.locked()

    def _read_is_due(self) -> bool:
        """With the lock."""
        return self.clock.now_ms() + self.horizon_ms // 2 >= self._until

    def _live(self, key: str, tie: int) -> bool:
        current = self._tokens.get(key)
        return current is not None and current[2] == tie

    def push(self, due_ms: int, shard: int, key: str, token: Any = None) -> None:
        """The key's item is now this one; with a store, one due beyond the window is
        left to the store (and the key's older item goes)."""
        with self._cond:
            if self.store is not None and due_ms > self._until:
                self._tokens.pop(key, None)
                return
            if self._put(due_ms, shard, key, token):
                self._cond.notify()

    def _put(self, due_ms: int, shard: int, key: str, token: Any) -> bool:
        """With the lock; True if the item is now the earliest."""
        tie = next(self._tie)
        self._tokens[key] = (shard, token, tie)
        heapq.heappush(self._heap, (due_ms, tie, shard, key))
        return self._heap[0][1] == tie

    def claim(self, shards: list[int]) -> None:
        """Hold the items of newly owned ``shards`` due within the window (a read of
        the store; without one, nothing to do: the owner pushes them)."""
        if self.store is None:
            return
        with self._reading:
            with self._cond:
                self._shards.update(shards)
                until = self._until
            self._take_stored(self.store.read(shards, None, until))

    def _take_stored(self, items: Stored) -> None:
        """Hold items read from the store, except those of shards dropped meanwhile and
        those whose key a push set meanwhile (the push is as new as the store, or
        newer)."""
        with self._cond:
            first = False
            for due_ms, shard, key, token in items:
                if shard in self._shards and key not in self._tokens:
                    first = self._put(due_ms, shard, key, token) or first
            if first:
                self._cond.notify()

    def _move_window(self) -> None:
        """On the queue's thread: read the stretch of due times the window gains."""
        assert self.store is not None
        with self._reading:
            with self._cond:
                after = self._until
                self._until = self.clock.now_ms() + self.horizon_ms
                until, shards = self._until, sorted(self._shards)
            try:
                items = self.store.read(shards, after, until) if shards else []
            except Exception as exc:  # Redis unavailable: the stretch is read again
                log.warning("%s: reading the items due until %d failed: %s", self.name, until, exc)
                with self._cond:  # read again: what was pushed meanwhile stays
                    self._until = min(self._until, after)
                self._read_after = time.monotonic() + RETRY_SECONDS
                return
            self._take_stored(items)

    def discard(self, key: str) -> None:
        with self._cond:
            self._tokens.pop(key, None)

    def drop_shards(self, shards: set[int]) -> None:
        with self._cond:
            self._shards -= shards
            for key in [k for k, (s, _, _) in self._tokens.items() if s in shards]:
                del self._tokens[key]

    def _window_moves(self) -> bool:
        """With the lock: whether to read the window's next stretch now."""
        return (
            self.store is not None and self._read_is_due() and time.monotonic() >= self._read_after
        )

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
                    if self._window_moves():
                        items = None
                        break
                    found = self._next()
                    if isinstance(found, list):
                        items = found
                        break
                    if self.store is not None:  # the window moves on in time
                        found = 1.0 if found is None else min(found, 1.0)
                    self._cond.wait(timeout=found)
                if items is not None:
                    self._handing += len(items)
            if items is None:
                self._move_window()
                continue
            try:
                self.on_due(items)
            except Exception:
                log.exception("%s: handing over %d items failed", self.name, len(items))
            finally:
                with self._cond:
                    self._handing -= len(items)
