"""Plain ``def`` actor code, run off the event loop on a few threads and handed back in
batches.

Why not a ``ThreadPoolExecutor``: it hands each call over alone (a future, a wake-up
of a worker thread, a wake-up of the loop), and it wakes another worker for each call
while one is idle, so under load every worker takes its turn at the GIL. With 100
HTTP callers of a plain-``def`` counter that cost about 100 us a call, a fifth of the
node's CPU.

Here calls wait in one queue, which the workers awake take one call at a time; a
worker goes back to sleep only when the queue is empty, and only as many are awake as
the queue needs. Results go back to the loop together: one wake-up of the loop for
all the calls that finished since it last took their results.

Calls and results pass through ``collections.deque``, whose ``append`` and
``popleft`` are atomic: no lock is taken for a call that finds a worker awake. The
lock guards only a worker's going to sleep and its waking (a worker re-checks the
queue under it before it sleeps, and the loop staffs under it after queuing, so no
call is ever left with every worker asleep). A lock per call, taken by the loop and
by the workers, had the loop wait for a worker that the GIL had stopped inside it:
about 5 us a message with 10,000 actors.

What a caller may rely on:

- **Order**: calls start in the order they were queued (an actor runs one message at
  a time, so its own calls never overlap).
- **Blocking code** (``time.sleep``, a slow library): a call running longer than
  ``blocked_after`` (10 ms) counts as blocked, and another worker takes the queue
  behind it within about that time. Other actors' plain methods are thus delayed by
  at most about ``blocked_after`` once, not for the whole blocking call, until all
  ``workers`` threads are blocked at the same time. ``async def`` methods run on
  the loop and never wait for these threads.
- **Context**: the caller wraps its function in its own ``contextvars`` context; this
  module runs it as given.
- **Cancellation**: a call whose future was cancelled before it started does not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: A call running longer than this (seconds) counts as blocked: another worker takes
#: the calls queued behind it.
BLOCKED_AFTER = 0.01


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]


def _closed_gate() -> threading.Lock:
    gate = threading.Lock()
    gate.acquire()
    return gate


@dataclass
class _Worker:
    #: Held while the worker may sleep: it sleeps by acquiring it, and is woken by one
    #: release (a lock, not a ``threading.Event``: waking through a ``Condition`` cost
    #: a sequential caller a tenth of its call).
    gate: threading.Lock = field(default_factory=_closed_gate)
    #: Taking calls from the queue (or about to); False while asleep.
    awake: bool = True
    #: ``time.monotonic()`` when its current call started; 0.0 between calls.
    started: float = 0.0


class SyncWorkers:
    """At most ``workers`` threads running plain functions for one event loop."""

    def __init__(self, workers: int, blocked_after: float = BLOCKED_AFTER) -> None:
        self.max_workers = max(1, workers)
        self.blocked_after = blocked_after
        #: Guards the workers' sleeping and waking (``_workers``, ``_asleep``, ``awake``).
        self._lock = threading.Lock()
        self._queue: deque[_Call] = deque()
        self._workers: list[_Worker] = []
        self._asleep: list[_Worker] = []
        self._results: deque[tuple[_Call, bool, Any]] = deque()
        #: A ``_deliver`` is scheduled on the loop and has not begun taking results.
        self._delivery_due = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._closed = False

    def run(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Queue ``fn``; its result (or exception) comes back on the running loop."""
        loop = self._loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("the sync workers are closed")
        call = _Call(fn, loop.create_future())
        self._queue.append(call)
        now = time.monotonic()
        if not self._taken(now):
            with self._lock:
                self._staff(now)
        if self._watch is None:
            self._watch = loop.call_later(self.blocked_after, self._check)
        return call.future

    def close(self) -> None:
        """Stop the workers once their current call returns; queued calls are
        cancelled."""
        with self._lock:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            for worker in self._asleep:  # (the others see it after their call)
                worker.gate.release()
            self._asleep.clear()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for call in queued:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                call.future.get_loop().call_soon_threadsafe(call.future.cancel)

    # -- on the loop -------------------------------------------------------------------------

    def _taken(self, now: float) -> bool:
        """Whether a worker will take the queue soon: one awake, between calls or in a
        call that has not run for ``blocked_after`` yet. Read without the lock: a
        worker seen awake either takes the queue or, on its way to sleep, looks at
        it again under the lock and finds what was queued before this look."""
        return any(
            w.awake and (not w.started or now - w.started < self.blocked_after)
            for w in self._workers
        )

    def _staff(self, now: float) -> None:
        """Make sure someone takes the queue soon (see :meth:`_taken`); else wake a
        worker, or start one (up to ``max_workers``). Called with the lock held."""
        if self._taken(now) or self._closed:
            return
        if self._asleep:
            worker = self._asleep.pop()
            worker.awake = True
            worker.gate.release()
        elif len(self._workers) < self.max_workers:
            worker = _Worker()
            self._workers.append(worker)
            name = f"troth-sync-{len(self._workers)}"
            threading.Thread(target=self._work, args=(worker,), name=name, daemon=True).start()

    def _check(self) -> None:
        """While calls are queued, look again every ``blocked_after``: the workers
        taking them may have blocked since."""
        self._watch = None
        if not self._queue or self._closed:
            return
        with self._lock:
            self._staff(time.monotonic())
        assert self._loop is not None
        self._watch = self._loop.call_later(self.blocked_after, self._check)

    def _deliver(self) -> None:
        # Cleared before taking results: a result handed back from now on schedules
        # another delivery, one handed back before is taken by this one.
        self._delivery_due = False
        results = self._results
        while results:
            call, ok, value = results.popleft()
            if call.future.cancelled():
                continue
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)

    # -- on a worker thread ------------------------------------------------------------------

    def _work(self, worker: _Worker) -> None:
        queue = self._queue
        while not self._closed:
            try:
                call = queue.popleft()
            except IndexError:
                if self._may_sleep(worker):
                    worker.gate.acquire()  # until _staff or close releases it
                continue
            if not call.future.cancelled():
                worker.started = time.monotonic()
                self._hand_back(_outcome(call))
                worker.started = 0.0
            # A sleeping worker holds nothing of its last call: an actor that ended
            # is freed at once, by reference counting.
            del call

    def _may_sleep(self, worker: _Worker) -> bool:
        """Whether ``worker``, finding the queue empty, may sleep (it is then listed
        asleep): not if a call was queued meanwhile."""
        with self._lock:
            if self._queue or self._closed:
                return False
            worker.awake = False
            self._asleep.append(worker)
            return True

    def _hand_back(self, result: tuple[_Call, bool, Any]) -> None:
        self._results.append(result)
        if not self._delivery_due:
            self._delivery_due = True
            # (RuntimeError: the loop closed meanwhile, nobody waits any more)
            with contextlib.suppress(RuntimeError):
                result[0].future.get_loop().call_soon_threadsafe(self._deliver)


def _outcome(call: _Call) -> tuple[_Call, bool, Any]:
    """``(call, True, its result)``, or ``(call, False, the exception it raised)``."""
    try:
        return (call, True, call.fn())
    except StopIteration as exc:  # a future refuses it (as a coroutine would)
        error = RuntimeError(f"{call.fn!r} raised StopIteration")
        error.__cause__ = exc
        return (call, False, error)
    except BaseException as exc:  # handed to the caller, as an executor would
        return (call, False, exc)
