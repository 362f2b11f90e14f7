"""``self.plugins.timers``: durable timers, committed with the transaction.

``after(seconds, method, *args, name=..., **kwargs)``, ``at(when, ...)`` and
``every(seconds, ...)`` schedule ``method(*args, **kwargs)`` on this actor;
``cancel(name)`` removes a timer. A name (by default the method's name) identifies
the timer: setting it again replaces it.

Guarantees:

* a timer exists once the transaction that set it commits, and not before; a
  rolled-back transaction sets and cancels nothing;
* a timer fires after its due time, on whichever node owns the actor then, also
  after restarts and moves, and its handler's commit deletes it atomically: it is
  handled **exactly once** (a handler that raises consumes the timer too, with the
  state unchanged, so a failing handler cannot loop);
* during its handler, ``self.plugins.timers.firing`` tells the timer's name, when
  it was due, when it fired and how late it is.

Catch-up policy: an overdue one-shot timer fires once, however late, and reports
its lateness. A periodic (``every``) timer that missed several periods (the node
was down) fires **once** for all of them, reports ``missed`` periods, and keeps its
original phase for the next due time: no burst of catch-up firings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from troth.core import codec
from troth.core.names import ActorName
from troth.core.plugin import ActorPlugin, PluginFactory
from troth.core.records import CommitOps, TimerRecord, TxnInfo, timer_key

MAX_TIMERS_PER_ACTOR = 1000


def _new_id() -> str:
    """A timer's id: 128 random bits, which only have to differ from the timer's
    earlier ids (they never leave Redis), so the fast generator serves, not the
    system's (``uuid4`` costs a system call; ``random`` reseeds after a fork)."""
    return f"{random.getrandbits(128):032x}"


@dataclass(frozen=True, slots=True)
class TimerFiring:
    name: str
    due_at: float
    fired_at: float
    lateness_seconds: float
    missed: int = 0


class Timers(ActorPlugin):
    """pstate: ``{name: {"id", "due_ms", "method", "every"}}`` of the committed timers."""

    #: It reads only its own plugin state, which a group carries from call to call.
    groupable: ClassVar[bool] = True

    def __init__(self, actor: ActorName, pstate: dict[str, Any]) -> None:
        super().__init__(actor, pstate)
        self._set: dict[str, TimerRecord] = {}
        self._cancel: set[str] = set()
        self.firing: TimerFiring | None = None

    def after(
        self, seconds: float, method: str, *args: Any, name: str | None = None, **kwargs: Any
    ) -> str:
        txn = self._require_txn()
        return self._schedule(
            name or method, method, args, kwargs, txn.now_ms + int(seconds * 1000), None
        )

    def at(
        self,
        when: datetime | float,
        method: str,
        *args: Any,
        name: str | None = None,
        **kwargs: Any,
    ) -> str:
        """``when`` is an aware datetime or a Unix timestamp in seconds."""
        self._require_txn()
        if isinstance(when, datetime):
            if when.tzinfo is None:
                raise ValueError("timers.at needs a timezone-aware datetime")
            when = when.timestamp()
        return self._schedule(name or method, method, args, kwargs, int(when * 1000), None)

    def every(
        self,
        seconds: float,
        method: str,
        *args: Any,
        name: str | None = None,
        start_after: float | None = None,
        **kwargs: Any,
    ) -> str:
        txn = self._require_txn()
        if seconds <= 0:
            raise ValueError("timers.every needs a positive period")
        first = seconds if start_after is None else start_after
        return self._schedule(
            name or method, method, args, kwargs, txn.now_ms + int(first * 1000), float(seconds)
        )

    def cancel(self, name: str) -> bool:
        """Cancel a timer; True if it existed (committed or set in this transaction)."""
        self._require_txn()
        existed = self.pstate.pop(name, None) is not None
        existed = self._set.pop(name, None) is not None or existed
        self._cancel.add(name)
        return existed

    def pending(self) -> dict[str, dict[str, Any]]:
        """The actor's timers: name -> ``{due_ms, method, every}``."""
        return {n: {k: v for k, v in t.items() if k != "id"} for n, t in self.pstate.items()}

    def _schedule(
        self,
        name: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        due_ms: int,
        every: float | None,
    ) -> str:
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ValueError("a timer name must be a non-empty string of at most 200 characters")
        if name not in self.pstate and len(self.pstate) >= MAX_TIMERS_PER_ACTOR:
            raise ValueError(f"{self.actor} has {MAX_TIMERS_PER_ACTOR} timers already")
        codec.pack([list(args), kwargs])  # fail now, not at commit, on bad arguments
        record = TimerRecord(
            actor=str(self.actor),
            name=name,
            id=_new_id(),
            method=method,
            args=list(args),
            kwargs=dict(kwargs),
            due_ms=due_ms,
            every_seconds=every,
        )
        self._set[name] = record
        self._cancel.discard(name)
        self.pstate[name] = {"id": record.id, "due_ms": due_ms, "method": method, "every": every}
        return name

    # -- transaction protocol ----------------------------------------------------------

    def begin(self, txn: TxnInfo) -> None:
        super().begin(txn)
        self._set.clear()
        self._cancel.clear()
        self.firing = None
        timer = txn.timer
        if timer is None:
            return
        now = txn.now_ms
        missed = 0
        if self.pstate.get(timer.name, {}).get("id") == timer.id:
            del self.pstate[timer.name]  # consumed by this commit (the commit guards it)
            if timer.every_seconds:
                period = int(timer.every_seconds * 1000)
                periods = max(1, (now - timer.due_ms) // period + 1)
                missed = periods - 1
                self._schedule(
                    timer.name,
                    timer.method,
                    tuple(timer.args),
                    timer.kwargs,
                    timer.due_ms + periods * period,
                    timer.every_seconds,
                )
        self.firing = TimerFiring(
            name=timer.name,
            due_at=timer.due_ms / 1000,
            fired_at=now / 1000,
            lateness_seconds=max(0.0, (now - timer.due_ms) / 1000),
            missed=missed,
        )

    def prepare(self, ops: CommitOps) -> None:
        actor = str(self.actor)
        ops.timers_cancel.extend(timer_key(actor, n) for n in self._cancel)
        ops.timers_set.extend(self._set.values())

    def prepare_delete(self, ops: CommitOps) -> None:
        actor = str(self.actor)
        ops.timers_cancel.extend(timer_key(actor, n) for n in self.pstate)
        ops.timers_set.clear()

    def committed(self) -> None:
        super().committed()
        self._set.clear()
        self._cancel.clear()

    def abort(self) -> None:
        super().abort()
        self._set.clear()
        self._cancel.clear()


class TimersFactory(PluginFactory):
    name: ClassVar[str] = "timers"

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Timers(actor, pstate)
