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
        self._lock = threading.Lock()
        self._queue: deque[_Call] = deque()
        self._workers: list[_Worker] = []
        self._asleep: list[_Worker] = []
        self._results: list[tuple[_Call, bool, Any]] = []
        self._delivery_due = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._closed = False

    def run(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Queue ``fn``; its result (or exception) comes back on the running loop."""
        loop = self._loop = asyncio.get_running_loop()
        call = _Call(fn, loop.create_future())
        with self._lock:
            if self._closed:
                raise RuntimeError("the sync workers are closed")
            self._queue.append(call)
            self._staff(time.monotonic())
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

    def _staff(self, now: float) -> None:
        """Make sure someone takes the queue soon: an awake worker between calls or in
        a call that has not run for ``blocked_after`` yet; else wake one, or start one
        (up to ``max_workers``). Called with the lock held."""
        for worker in self._workers:
            if worker.awake and (not worker.started or now - worker.started < self.blocked_after):
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
        with self._lock:
            if not self._queue or self._closed:
                return
            self._staff(time.monotonic())
        assert self._loop is not None
        self._watch = self._loop.call_later(self.blocked_after, self._check)

    def _deliver(self) -> None:
        with self._lock:
            results, self._results = self._results, []
            self._delivery_due = False
        for call, ok, value in results:
            if call.future.cancelled():
                continue
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)

    # -- on a worker thread ------------------------------------------------------------------

    def _work(self, worker: _Worker) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                call = self._queue.popleft() if self._queue else None
                if call is None:
                    worker.awake = False
                    self._asleep.append(worker)
            if call is None:
                worker.gate.acquire()  # until _staff or close releases it
                continue
            if call.future.cancelled():
                continue
            worker.started = time.monotonic()
            # (no local keeps the result: a sleeping worker holds nothing of its last call)
            self._hand_back(_outcome(call))
            worker.started = 0.0

    def _hand_back(self, result: tuple[_Call, bool, Any]) -> None:
        with self._lock:
            self._results.append(result)
            due, self._delivery_due = self._delivery_due, True
        if not due:
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
