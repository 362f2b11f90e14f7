"""The transactional plugin protocol, and the records plugins hand to a commit.

A plugin has two halves:

* a **factory**, one per node, built from the plugin's settings in the config. It
  owns shared resources (an HTTP client, say) and may register outbox
  *executors*: the code that performs a committed side effect of some ``kind``.
* an **actor plugin**, one per active actor, reached as ``self.plugins.NAME``. It
  never performs a side effect itself: inside a transaction it only *buffers*.

The transaction drives every actor plugin through::

    begin()  ->  [method runs]  ->  prepare(ops)  ->  Redis commit  ->  committed()
                                \\->  abort()   (on any failure, before or at commit)

``prepare`` adds the buffered effects to :class:`CommitOps`, which the commit
writes atomically with the actor's state. ``committed`` runs only once that write
returned; ``abort`` drops the buffers. A plugin may also keep a small msgpack
dict in the checkpoint (``self.pstate``): it is snapshotted and rolled back
together with the actor's state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from . import codec

if TYPE_CHECKING:
    import redis

    from .access import Caller
    from .actor import Checkpoint
    from .keys import KeySpace
    from .metrics import NodeMetrics
    from .names import ActorName


class RetryPolicy(BaseModel):
    """When to try an effect again. The default schedule is 0s, 5s, 25s, 125s, 625s."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(5, ge=1, le=100)
    backoff: Literal["exponential", "linear", "fixed"] = "exponential"
    initial_delay_seconds: float = Field(5.0, ge=0, le=86_400)
    max_delay_seconds: float = Field(3_600.0, ge=0, le=7 * 86_400)
    jitter: float = Field(0.0, ge=0, le=1, description="Random +-fraction added to each delay.")

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (1-based; the first is 0)."""
        if attempt <= 1:
            return 0.0
        n = attempt - 1
        if self.backoff == "exponential":
            delay = self.initial_delay_seconds * (5 ** (n - 1))
        elif self.backoff == "linear":
            delay = self.initial_delay_seconds * n
        else:
            delay = self.initial_delay_seconds
        delay = min(delay, self.max_delay_seconds)
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, delay)


@dataclass(slots=True)
class OutboxEntry:
    """One committed side effect: a row of the activity ledger.

    ``status`` moves ``pending -> attempting -> pending`` (a retry) ``-> callback``
    (the result is being handed back to the origin actor) and ends by deletion,
    or in ``dead`` (attempts exhausted, no callback) or ``uncertain`` (a crash hid
    the outcome of an attempt at a non-idempotent effect).
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

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutboxEntry:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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
        """The stored form: the 32-character id, then msgpack (the commit guard reads the id)."""
        if len(self.id) != TIMER_ID_LEN:
            raise ValueError(f"timer id must be {TIMER_ID_LEN} characters")
        return self.id.encode() + codec.pack(_fields(self))

    @classmethod
    def decode(cls, raw: bytes) -> TimerRecord:
        data = codec.unpack(raw[TIMER_ID_LEN:])
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


T = TypeVar("T")
TIMER_ID_LEN = 32


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a shallow dict: encoding needs no deep copy (asdict's
    deep copy of payloads and histories was the outbox's main CPU cost)."""
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def timer_key(actor: str, name: str) -> str:
    return f"{actor}\x00{name}"


@dataclass(slots=True)
class CommitOps:
    """Everything besides state that one transaction commits atomically."""

    outbox: list[OutboxEntry] = field(default_factory=list)
    timers_set: list[TimerRecord] = field(default_factory=list)
    timers_cancel: list[str] = field(default_factory=list)
    notifications: list[bytes] = field(default_factory=list)


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


class ActorPlugin:
    """Base of the per-actor half of a plugin. Every hook is a no-op by default."""

    def __init__(self, actor: ActorName, pstate: dict[str, Any]) -> None:
        self.actor = actor
        self.pstate = pstate
        self.txn: TxnInfo | None = None

    def begin(self, txn: TxnInfo) -> None:
        self.txn = txn

    def prepare(self, ops: CommitOps) -> None:
        """Add buffered effects to ``ops``; may raise to veto the commit."""

    def prepare_delete(self, ops: CommitOps) -> None:
        """The actor deletes itself in this commit: add what must go with it (timers,
        say). Runs after :meth:`prepare`."""

    def committed(self) -> None:
        """Called after the commit returned; hand effects to the node."""
        self.txn = None

    def abort(self) -> None:
        """Drop every buffered effect."""
        self.txn = None

    def resume(self, checkpoint: Checkpoint) -> None:
        """Called on every (re)activation, inside the resume transaction."""

    def _require_txn(self) -> TxnInfo:
        if self.txn is None:
            raise RuntimeError(
                f"plugin {type(self).__name__} used outside a transaction of {self.actor}"
            )
        return self.txn


class ExecutionOutcome(BaseModel):
    """What an executor reports for one attempt."""

    ok: bool
    retryable: bool = False
    status_code: int | None = None
    error: str | None = None
    value: Any = None


class Executor(Protocol):
    """Performs committed outbox entries of one ``kind``.

    ``idempotent`` says whether repeating an attempt whose outcome a crash hid is
    safe (the receiver de-duplicates on the idempotency key); an entry whose spec
    says ``"idempotent": false`` overrides it. When it is not safe, such an entry
    becomes *uncertain* and is surfaced instead of being repeated.
    """

    kind: str
    idempotent: bool

    def execute(self, entry: OutboxEntry) -> ExecutionOutcome: ...


class NodeServices(Protocol):
    """What plugin factories may use of the node that hosts them."""

    node_id: str
    client: redis.Redis
    keys: KeySpace
    metrics: NodeMetrics

    def deliver(
        self,
        target: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        request_id: str,
        timeout: float,
        caller: Caller,
    ) -> Any: ...


class PluginFactory:
    """Base of the node half of a plugin."""

    name: ClassVar[str] = ""
    settings_model: ClassVar[type[BaseModel] | None] = None

    def __init__(self, node: NodeServices, settings: dict[str, Any]) -> None:
        self.node = node
        self.settings: Any = (
            self.settings_model.model_validate(settings) if self.settings_model else settings
        )

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        raise NotImplementedError

    def executors(self) -> list[Executor]:
        return []

    def close(self) -> None:
        """Release shared resources when the node stops."""


class BufferingPlugin(ActorPlugin, Generic[T]):
    """A plugin whose effects are a list, buffered per transaction: emptied when a
    transaction begins, commits or aborts, and handed to the commit by ``_flush``."""

    def __init__(self, actor: ActorName, pstate: dict[str, Any]) -> None:
        super().__init__(actor, pstate)
        self._buffer: list[T] = []

    def _flush(self, ops: CommitOps, buffer: list[T]) -> None:
        raise NotImplementedError

    def begin(self, txn: TxnInfo) -> None:
        super().begin(txn)
        self._buffer.clear()

    def prepare(self, ops: CommitOps) -> None:
        self._flush(ops, self._buffer)

    def committed(self) -> None:
        super().committed()
        self._buffer.clear()

    def abort(self) -> None:
        super().abort()
        self._buffer.clear()


class OutboxPlugin(BufferingPlugin[OutboxEntry]):
    """Base of plugins whose effects go through the outbox (``send``, ``http``)."""

    kind: ClassVar[str] = ""
    default_retry: ClassVar[RetryPolicy] = RetryPolicy()
    max_per_txn: ClassVar[int] = 1000

    def _enqueue(
        self,
        spec: dict[str, Any],
        *,
        idempotency_key: str | None,
        retry: RetryPolicy | dict[str, Any] | None,
        on_result: str | None,
        delay_seconds: float = 0.0,
        kind: str | None = None,
    ) -> str:
        """Buffer one effect; returns its entry id (stable if the message is re-run)."""
        kind = kind or self.kind
        txn = self._require_txn()
        if len(self._buffer) >= self.max_per_txn:
            raise ValueError(f"at most {self.max_per_txn} {kind} effects per transaction")
        if on_result is not None and (not on_result or on_result.startswith("_")):
            raise ValueError("on_result must name a public method of the actor")
        codec.pack(spec)  # fail inside the method, not at commit, on bad arguments
        policy = (
            retry
            if isinstance(retry, RetryPolicy)
            else RetryPolicy.model_validate(retry)
            if retry is not None
            else self.default_retry
        )
        entry_id = txn.next_id(kind)
        self._buffer.append(
            OutboxEntry(
                id=entry_id,
                kind=kind,
                origin=str(self.actor),
                spec=spec,
                idempotency_key=idempotency_key or entry_id,
                retry=policy.model_dump(),
                on_result=on_result,
                created_ms=txn.now_ms,
                next_ms=txn.now_ms + int(max(0.0, delay_seconds) * 1000),
            )
        )
        return entry_id

    def _flush(self, ops: CommitOps, buffer: list[OutboxEntry]) -> None:
        ops.outbox.extend(buffer)
