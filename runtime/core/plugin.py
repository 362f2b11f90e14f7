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
returned; ``abort`` drops the buffers. A plugin that is
:attr:`ActorPlugin.groupable` may see several ``begin`` .. ``prepare`` rounds, one a
call, before one ``committed`` or ``abort``. A plugin may also keep a small msgpack
dict in the checkpoint (``self.pstate``): it is snapshotted and rolled back
together with the actor's state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel

from troth.core import codec, tracing
from troth.core.clock import SYSTEM_CLOCK, Clock
from troth.core.errors import AppError
from troth.core.records import Checkpoint, CommitOps, OutboxEntry, TxnInfo
from troth.core.retry import RetryPolicy, stored_policy

if TYPE_CHECKING:
    import redis

    from troth.core.access import Caller
    from troth.core.batcher import Batcher
    from troth.core.keys import KeySpace
    from troth.core.metrics import NodeMetrics
    from troth.core.names import ActorName

__all__ = [
    "ActorPlugin",
    "BufferingPlugin",
    "ExecutionOutcome",
    "Executor",
    "OutboxPlugin",
    "PluginContext",
    "PluginFactory",
]

T = TypeVar("T")


class ActorPlugin:
    """Base of the per-actor half of a plugin. Every hook is a no-op by default."""

    #: Whether an actor using this plugin may commit several queued calls together
    #: (group commit, see :meth:`~troth.core.transaction.ActorRuntime.execute_group`).
    #: Then ``begin`` and ``prepare`` run for each call, ``committed`` or ``abort``
    #: once for the group, and ``discard`` for a call that failed. A plugin may say
    #: yes when nothing it answers depends on Redis, or when its reads account for
    #: the effects the group's earlier calls prepared (see ``members``). No, by
    #: default: then an actor that uses it commits every call on its own.
    groupable: ClassVar[bool] = False

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

    def discard(self) -> None:
        """One call of a group failed: drop what it buffered since its ``begin``, and
        keep what the earlier calls of the group prepared (they commit or abort
        together)."""
        self.abort()

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

    An executor may set ``records_attempts = False`` when nobody needs to know that
    an attempt began: its entries then skip the ledger's intent record (one Redis
    write each). Only for idempotent effects whose attempt count nobody reads (an
    index update, say): after a crash such an entry is simply performed again.

    Such an executor may also define ``async def execute_many(entries)`` returning
    one outcome per entry: the entries of its kind that fall due together then take
    one call, one task and one ledger write between them (an index update of every
    commitment of a batch). One that fails is then attempted on its own, with its
    retries.

    ``execute`` is best a coroutine (``async def``): it runs on the node's event
    loop, where thousands of attempts cost a task each. A plain ``def`` is accepted
    and runs on a small thread pool, so one that blocks never stalls the loop.
    """

    kind: str
    idempotent: bool

    def execute(self, entry: OutboxEntry) -> ExecutionOutcome | Awaitable[ExecutionOutcome]: ...


#: Delivers a message to an actor wherever it lives and returns its reply after the
#: receiver's commit: ``(target, method, args, kwargs, request_id, timeout, caller)``.
#: A coroutine of the node's event loop (where outbox executors run). With
#: ``request_id`` None no reply is kept for de-duplication.
Deliver = Callable[
    [str, str, list[Any], dict[str, Any], str | None, float, "Caller"], Awaitable[Any]
]


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a plugin factory may use of the node that hosts it; nothing else of the
    node is reachable from a plugin."""

    node_id: str
    client: redis.Redis
    #: The node's batched Redis round trips, for work on the event loop.
    batcher: Batcher
    keys: KeySpace
    metrics: NodeMetrics
    deliver: Deliver
    #: The node's time (a test's clock stands still or jumps; executors follow it).
    clock: Clock = SYSTEM_CLOCK
    #: Redis is a Cluster: a commit reaches only its shard's slot, so commit steps
    #: (:meth:`PluginFactory.commit_steps`) cannot touch other keys.
    cluster: bool = False


class PluginFactory:
    """Base of the node half of a plugin."""

    name: ClassVar[str] = ""
    settings_model: ClassVar[type[BaseModel] | None] = None

    def __init__(self, context: PluginContext, settings: dict[str, Any]) -> None:
        self.context = context
        self.settings: Any = (
            self.settings_model.model_validate(settings) if self.settings_model else settings
        )

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        raise NotImplementedError

    def executors(self) -> list[Executor]:
        return []

    def commit_steps(self) -> dict[str, str]:
        """This plugin's steps of the commit script: name -> Lua chunk defining
        ``STEPS[name]`` (see ``CheckpointStore.add_steps``). Actor plugins add them to a
        commit as :class:`~troth.core.records.CommitStep`\\ s in ``prepare``."""
        return {}

    def start(self) -> None:
        """Set up what the plugin keeps in Redis, when the node starts (before it
        serves; Redis is reachable through ``context.client``)."""

    def close(self) -> None:
        """Release shared resources when the node stops."""

    async def aclose(self) -> None:
        """Release resources bound to the node's event loop (HTTP sessions, say); runs
        on the loop when the node stops, before :meth:`close`."""


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
    #: Entries are only buffered, and nothing is read back: calls may be grouped.
    groupable: ClassVar[bool] = True
    default_retry: ClassVar[RetryPolicy] = RetryPolicy()
    max_per_txn: ClassVar[int] = 1000

    def __init__(self, actor: ActorName, pstate: dict[str, Any]) -> None:
        super().__init__(actor, pstate)
        self._withdrawn: dict[str, AppError] = {}

    def _enqueue(
        self,
        spec: dict[str, Any],
        *,
        idempotency_key: str | None,
        retry: RetryPolicy | dict[str, Any] | None,
        on_result: str | None,
        delay_seconds: float = 0.0,
        kind: str | None = None,
        replace_id: str | None = None,
        packable: bool = False,
    ) -> str:
        """Buffer one effect; returns its entry id (stable if the message is re-run).
        With ``replace_id`` the entry has that id and replaces one with the same id
        that is buffered or committed and not yet performed (see OutboxEntry).
        ``spec`` is packed once here, so that a value msgpack cannot hold fails the
        method that gave it rather than the commit; ``packable`` says the caller built
        it of values known to pack (validated JSON), which spares that packing (a
        delivery's payload may be 64 KB)."""
        kind = kind or self.kind
        txn = self._require_txn()
        if len(self._buffer) >= self.max_per_txn:
            raise ValueError(f"at most {self.max_per_txn} {kind} effects per transaction")
        if on_result is not None and (not on_result or on_result.startswith("_")):
            raise ValueError("on_result must name a public method of the actor")
        if not packable:
            codec.pack(spec)  # fail inside the method, not at commit, on bad arguments
        policy = stored_policy(self.default_retry if retry is None else retry)
        entry_id = replace_id or txn.next_id(kind)
        if replace_id is not None:
            self._buffer[:] = [e for e in self._buffer if e.id != replace_id]
        self._buffer.append(
            OutboxEntry(
                id=entry_id,
                kind=kind,
                origin=str(self.actor),
                spec=spec,
                idempotency_key=idempotency_key or entry_id,
                retry=policy,
                on_result=on_result,
                created_ms=txn.now_ms,
                next_ms=txn.now_ms + int(max(0.0, delay_seconds) * 1000),
                replaceable=replace_id is not None,
                trace=tracing.traceparent(),
            )
        )
        return entry_id

    def _withdraw(self, entry_id: str, refusal: AppError) -> None:
        """Delete the committed entry ``entry_id`` in this commit, on one condition
        checked by the commit itself: it was never attempted. If an attempt has begun
        (on any node, however recently), the whole transaction is refused and its
        caller gets ``refusal``; an entry already gone is no obstacle. So an effect is
        either withdrawn or performed, never both: what a cancel of a delayed delivery
        needs. An entry buffered in this transaction is dropped. The check reads the
        entry in Lua, which reads no msgpack bin type: an entry whose spec holds bytes
        cannot be withdrawn (it counts as begun)."""
        self._require_txn()
        self._buffer[:] = [e for e in self._buffer if e.id != entry_id]
        self._withdrawn[entry_id] = refusal

    def begin(self, txn: TxnInfo) -> None:
        super().begin(txn)
        self._withdrawn = {}

    def abort(self) -> None:
        super().abort()
        self._withdrawn = {}

    def _flush(self, ops: CommitOps, buffer: list[OutboxEntry]) -> None:
        if self._withdrawn:
            ops.extend(CommitOps(outbox_withdraw=self._withdrawn))
        ops.outbox.extend(buffer)
