"""The records one transaction commits besides the actor's state.

These are plain dataclasses, built inside a transaction by plugins and written
atomically with the checkpoint: :class:`CommitOps` gathers them, an
:class:`OutboxEntry` is one row of the activity ledger (a promised side effect),
a :class:`TimerRecord` one durable timer. :class:`TxnInfo` is what a plugin knows
of the transaction in progress; its ids are stable when a message is re-run, which
is what makes effects idempotent across crashes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from troth.core import codec
from troth.core.retry import RetryPolicy

if TYPE_CHECKING:
    from troth.core.errors import AppError
    from troth.core.names import ActorName

__all__ = [
    "TIMER_ID_LEN",
    "Checkpoint",
    "CommitOps",
    "CommitStep",
    "OutboxEntry",
    "TimerRecord",
    "TxnInfo",
    "timer_key",
]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What ``resume`` is told about the checkpoint it was loaded from."""

    version: str
    seq: int
    created_ms: int
    updated_ms: int
    upgraded_from: str | None = None


@dataclass(slots=True)
class OutboxEntry:
    """One committed side effect: a row of the activity ledger.

    ``status`` moves ``pending -> attempting -> pending`` (a retry) ``-> callback``
    (the result is being handed back to the origin actor) and ends by deletion,
    or in ``dead`` (attempts exhausted, no callback) or ``uncertain`` (a crash hid
    the outcome of an attempt at a non-idempotent effect).

    A ``replaceable`` entry has a stable id: a later commit that buffers an entry
    with the same id replaces it if it has not been performed yet, so only the
    newest is (an index row that changes several times in a second, say). The
    dispatcher then writes it only while it is still the version it attempted.
    """

    id: str
    kind: str
    origin: str
    spec: dict[str, Any]
    idempotency_key: str
    retry: dict[str, Any]
    on_result: str | None = None
    status: str = "pending"
    attempts: int = 0
    created_ms: int = 0
    next_ms: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    replaceable: bool = False
    #: The W3C ``traceparent`` of the transaction that committed it (tracing on), so
    #: that its attempts continue that trace, on whichever node makes them.
    trace: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The stored form: a value of the ledger's hash, whose field is the id. It
        leaves out the id and every field at its default (the idempotency key when it
        is the id, the default retry policy): pending entries (an armed delivery waits
        for months) are most of the ledger's bytes. :meth:`load` reads it back, so
        ``RetryPolicy``'s defaults are part of the stored format: a change of them
        applies to the entries stored with them."""
        data = _fields(self)
        del data["id"]
        for name, default in _OUTBOX_DEFAULTS:
            if data[name] == default:
                del data[name]
        if self.idempotency_key == self.id:
            del data["idempotency_key"]
        if self.retry == _DEFAULT_RETRY:
            del data["retry"]
        return data

    @classmethod
    def load(cls, entry_id: str | bytes, raw: bytes) -> OutboxEntry:
        """The entry stored under ``entry_id`` (see :meth:`to_dict`). Entries stored
        whole by earlier versions load too."""
        if isinstance(entry_id, bytes):
            entry_id = entry_id.decode()
        data = codec.unpack(raw)
        data["id"] = entry_id
        data.setdefault("idempotency_key", entry_id)
        data.setdefault("retry", dict(_DEFAULT_RETRY))
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


_DEFAULT_RETRY: dict[str, Any] = RetryPolicy().model_dump()
_OUTBOX_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("on_result", None),
    ("status", "pending"),
    ("attempts", 0),
    ("history", []),
    ("result", None),
    ("replaceable", False),
    ("trace", None),
)


@dataclass(slots=True)
class TimerRecord:
    """A durable timer of one actor; ``id`` changes whenever the timer is (re)set."""

    actor: str
    name: str
    id: str
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    due_ms: int
    every_seconds: float | None = None

    @property
    def key(self) -> str:
        return timer_key(self.actor, self.name)

    def encode(self) -> bytes:
        """The stored form: the 32-character id (the commit guard reads it), then the
        other fields in msgpack, without the defaults."""
        if len(self.id) != TIMER_ID_LEN:
            raise ValueError(f"timer id must be {TIMER_ID_LEN} characters")
        fields = _fields(self)
        del fields["id"]
        if self.every_seconds is None:
            del fields["every_seconds"]
        return self.id.encode() + codec.pack(fields)

    @classmethod
    def decode(cls, raw: bytes) -> TimerRecord:
        data = codec.unpack(raw[TIMER_ID_LEN:])
        data["id"] = raw[:TIMER_ID_LEN].decode()
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


TIMER_ID_LEN = 32


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a shallow dict: encoding needs no deep copy (asdict's
    deep copy of payloads and histories was the outbox's main CPU cost)."""
    known = _GETTERS.get(type(obj))
    if known is None:
        names = tuple(obj.__dataclass_fields__)  # (several: attrgetter returns a tuple)
        known = _GETTERS[type(obj)] = (names, operator.attrgetter(*names))
    names, values = known
    return dict(zip(names, values(obj), strict=True))


#: Per dataclass of this module: its field names, and one call that reads them all.
_GETTERS: dict[type, tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]] = {}


def timer_key(actor: str, name: str) -> str:
    return f"{actor}\x00{name}"


@dataclass(slots=True)
class CommitStep:
    """A plugin's own step of the commit script (see ``PluginFactory.commit_steps``).

    The script runs every step's ``check`` after its own guards and before it writes
    anything; a check may refuse the commit, which then writes nothing and raises
    ``refusal(reason)`` in the transaction. After the commit's own writes it runs
    every step's ``apply``. So bookkeeping on keys outside the actor's own (an index
    across actors) moves with the state: exactly once, in the same round trip, never
    seen half done. Only on a single Redis: on Redis Cluster one script reaches only
    its shard's slot.
    """

    #: The step's name: what its Lua chunk registers as ``STEPS[name]``.
    name: str
    keys: list[str]
    args: list[Any]
    refusal: Callable[[str], Exception] | None = None


@dataclass(slots=True)
class CommitOps:
    """Everything besides state that one transaction commits atomically."""

    outbox: list[OutboxEntry] = field(default_factory=list)
    timers_set: list[TimerRecord] = field(default_factory=list)
    timers_cancel: list[str] = field(default_factory=list)
    notifications: list[bytes] = field(default_factory=list)
    members_add: list[str] = field(default_factory=list)
    members_remove: list[str] = field(default_factory=list)
    #: Committed outbox entries to delete, each only if it was never attempted: entry
    #: id -> the error the caller gets when one was (the commit is then refused).
    outbox_withdraw: dict[str, AppError] = field(default_factory=dict)
    #: Plugins' steps of the commit script, run in this order.
    steps: list[CommitStep] = field(default_factory=list)

    def empty(self) -> bool:
        """Whether there is nothing to commit besides the state."""
        return not (
            self.outbox
            or self.outbox_withdraw
            or self.timers_set
            or self.timers_cancel
            or self.notifications
            or self.members_add
            or self.members_remove
            or self.steps
        )

    def extend(self, later: CommitOps) -> None:
        """Append the ops of a later message of the same commit. The commit script
        applies each kind of op in one place (timer cancels before timer sets, member
        removals before additions), so a later op that undoes an earlier one of
        another kind replaces it here: what is committed is what the messages, one
        after another, would have left."""
        if later.outbox_withdraw:  # an entry of this very commit is simply not written
            self.outbox[:] = [e for e in self.outbox if e.id not in later.outbox_withdraw]
            self.outbox_withdraw.update(later.outbox_withdraw)
        self.outbox.extend(later.outbox)
        if later.timers_cancel:
            gone = set(later.timers_cancel)
            self.timers_set[:] = [t for t in self.timers_set if t.key not in gone]
            self.timers_cancel.extend(later.timers_cancel)
        if later.timers_set:
            reset = {t.key for t in later.timers_set}
            self.timers_set[:] = [t for t in self.timers_set if t.key not in reset]
            self.timers_set.extend(later.timers_set)
        self.notifications.extend(later.notifications)
        self.steps.extend(later.steps)
        for mine, other, theirs in (
            (self.members_add, self.members_remove, later.members_add),
            (self.members_remove, self.members_add, later.members_remove),
        ):
            if theirs:
                undone = set(theirs)
                other[:] = [m for m in other if m not in undone]
                mine.extend(theirs)


@dataclass(slots=True)
class TxnInfo:
    """What a plugin may know about the transaction in progress."""

    actor: ActorName
    seq: int
    now_ms: int
    kind: str
    method: str
    request_id: str | None = None
    timer: TimerRecord | None = None
    ids: int = 0

    def next_id(self, label: str) -> str:
        """An id unique to this commit and stable if it is re-run (``name:seq:label:n``)."""
        self.ids += 1
        return f"{self.actor}:{self.seq}:{label}{self.ids}"
