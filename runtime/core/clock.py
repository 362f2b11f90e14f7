"""The time troth runs on: real by default, controllable in tests.

Two readings: ``now_ms`` is wall-clock time in milliseconds since the epoch, the
time that is *stored* (transaction times, timer due times, outbox schedules, reply
expiry); ``monotonic`` measures intervals on one node (pulses, idleness). Every
part of a node reads both from the one :class:`Clock` it was built with, so a
:class:`ManualClock` moves all of them together: advancing it fires the timers,
pulses and retries that fall due, in due order, without waiting
(:mod:`troth.testing` builds on it).

Leases and deadlines of Redis round trips stay on real time: they measure other
processes, which a test's clock does not control.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock:
    """The interface: real time, and a way to hear about jumps (real time has none)."""

    def now_ms(self) -> int:
        raise NotImplementedError

    def monotonic(self) -> float:
        raise NotImplementedError

    def on_jump(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from any thread) whenever the time jumps forward, so that
        a component waiting for a due time re-reads the clock. A listener that raises
        is dropped: its component has stopped."""


class SystemClock(Clock):
    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock(Clock):
    """Time that moves only when told to; both readings move together.

    Thread-safe: a test thread advances it while the node's threads read it.
    """

    def __init__(self, start_ms: int | None = None) -> None:
        self._ms = int(time.time() * 1000) if start_ms is None else start_ms
        self._origin = self._ms
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def now_ms(self) -> int:
        return self._ms

    def monotonic(self) -> float:
        # Far from zero like time.monotonic(), so "never" (0.0) stays in the past.
        return 1_000_000.0 + (self._ms - self._origin) / 1000

    def on_jump(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (>= 0) and wake every waiting component."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        with self._lock:
            self._ms += round(seconds * 1000)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:
                with self._lock:
                    self._listeners.remove(listener)


#: The clock of every node not given one.
SYSTEM_CLOCK = SystemClock()
