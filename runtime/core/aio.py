"""An asyncio event loop on a thread of its own, and small asyncio helpers.

A node runs everything asynchronous on one such loop (see :mod:`troth.node`); the
synchronous client library runs its :class:`~troth.client.AsyncClient` on another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import warnings
from collections import deque
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (several times faster at what a node does
    most: socket I/O, callbacks, futures), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def check_cpu(cpu: int) -> None:
    """Raise ValueError unless this process may pin a thread to ``cpu`` (Linux only)."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("pinning to a CPU needs Linux (os.sched_setaffinity)")
    allowed = sorted(os.sched_getaffinity(0))
    if cpu not in allowed:
        raise ValueError(f"CPU {cpu} is not one this process may run on (allowed: {allowed})")


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Within it, the calling thread runs on ``cpu``, and so will every thread it
    starts (they inherit the pin); after it, the calling thread runs where it did
    before. ``None``: nothing changes."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class LoopThread:
    """An event loop running on a thread of its own.

    With ``cpu``, the thread is pinned to that CPU before the loop starts, and so is
    every thread it starts later (Linux threads inherit their creator's affinity): a
    node's plain-``def`` workers and its helper threads. Their Python code takes
    turns under the GIL anyway, and a thread woken on the CPU of the thread that
    wakes it is woken for a fraction of the cost of one woken on another (on this
    project's virtual machines, 4 us against 60 us a round trip: waking an idle
    virtual CPU costs a trip through the hypervisor).
    """

    def __init__(self, name: str, cpu: int | None = None) -> None:
        if cpu is not None:
            check_cpu(cpu)
        self.cpu = cpu
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        #: The thread's id for the kernel (``/proc/self/task/ID``).
        self.native_id: int = self._thread.native_id or 0

    def _run(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})  # this thread only (0: the caller)
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self.loop.is_running():
            # uvloop reports transports left open while closing; with warnings made
            # errors (as in a test run) that report would hang close() instead.
            with warnings.catch_warnings():
                warnings.simplefilter("default", ResourceWarning)
                self.loop.close()


def start(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """``asyncio.create_task(coro)`` on the running loop, made directly: the loop's own
    ``create_task`` (asyncio's and uvloop's alike) adds about 1 us a task to what the
    task itself costs (about 4 us), and the engine starts one for each message to an
    idle actor. (A task factory set on the loop is not used: troth's loops set none.)"""
    return asyncio.Task(coro, loop=asyncio.get_running_loop())


class Background:
    """Fire-and-forget tasks, referenced until they finish (asyncio keeps only weak
    references to tasks, so an unreferenced one may vanish mid-flight)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = start(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def pending(self) -> list[asyncio.Future[Any]]:
        """The tasks that have not finished yet."""
        return [t for t in self._tasks if not t.done()]


class Slots:
    """A counting semaphore for paths every delivery or call takes (the outbound HTTP
    client's connections, the client library's calls in flight): first come, first
    served, as ``asyncio.Semaphore``, at a fraction of its cost when a slot is free
    (``asyncio.Semaphore`` runs seven Python calls for each ``async with``).

    Use it as::

        if not slots.take_now():
            await slots.take()
        try:
            ...
        finally:
            slots.give()

    A slot given back goes straight to the longest waiter, so none is ever free while
    someone waits, and a newcomer never overtakes a waiter.
    """

    __slots__ = ("_waiters", "free")

    def __init__(self, count: int) -> None:
        self.free = count
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        """Take a slot if one is free (then none is awaited)."""
        if self.free > 0:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a slot, in turn."""
        if self.take_now():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # given a slot, then cancelled
                self.give()
            raise

    def give(self) -> None:
        """Give a slot back: to the longest waiter, else to the free ones."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # (a cancelled waiter left)
                waiter.set_result(None)
                return
        self.free += 1
