"""One message = one transaction.

:meth:`ActorRuntime.execute` is the whole protocol:

1. every plugin ``begin``\\ s a buffer; the last committed state is the snapshot;
2. the method or hook runs: an ``async def`` on the engine's event loop, a plain
   function on the engine's pool of worker threads (:class:`Invoker`); effects
   buffered before and after an ``await`` belong to the same transaction;
3. plugins ``prepare`` their buffered effects; state, plugin state and reply are
   encoded (msgpack for the checkpoint, strict JSON for a caller's reply);
4. one atomic, fenced commit, sent together with the other actors' commits of the
   same loop turn (:class:`~troth.core.batcher.Batcher`). A message that changed no
   state, no plugin state and buffered no effect commits nothing: it only checks,
   by a read, that this node still holds the shard;
5. only after the commit returned: plugins release their effects and the reply is
   returned; the next message sees the decoded committed state (so what a method
   sees never differs from what a reload would). It is decoded when that message
   begins, not after each commit: an actor that passivates or is deleted before its
   next message never pays for it.

On any failure (an :class:`AppError`, any other exception, unserializable state,
a refused or failed commit) the state and plugin states are restored from the
snapshot, every plugin ``abort``\\ s, and the error propagates.

:meth:`ActorRuntime.execute_group` runs several queued calls of one actor this way,
one after another, and commits them in one step 4 (group commit); its docstring says
what that changes.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from troth.core import codec, logcontext, tracing
from troth.core.access import OPERATOR, Caller
from troth.core.actor import CA
from troth.core.checkpoint import CheckpointStore, CommitRequest
from troth.core.errors import (
    ActorError,
    AppError,
    FencedError,
    SerializationError,
    TrothError,
    UnavailableError,
)
from troth.core.jsonsafe import check_encodable
from troth.core.metrics import NodeMetrics
from troth.core.names import ActorName
from troth.core.plugin import ActorPlugin
from troth.core.records import CommitOps, TimerRecord, TxnInfo
from troth.core.sync_workers import SyncWorkers

log = logging.getLogger(__name__)


class TimerAlreadyHandled(TrothError):
    """A timer firing lost the race against another firing or a cancel: drop it."""


class AlreadySettled(TrothError):
    """An outbox result was taken in already (its entry is gone): drop the repeat."""


class StaleActivation(UnavailableError):
    """The commit proved this activation stale (fenced, or seq moved on): reload it."""


class GroupBreak(TrothError):
    """Internal: a call of a group made a plugin that cannot be grouped (see
    :meth:`ActorRuntime.execute_group`); it runs again at the head of a group."""


@dataclass(slots=True)
class Message:
    """A unit of work for one actor; ``kind`` is call, init, resume, pulse, timer,
    result (an outbox entry's outcome, handed back to the actor that made it) or
    delete (an operator's order: the actor deletes itself)."""

    kind: str
    method: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    timer: TimerRecord | None = None
    caller: Caller = OPERATOR
    #: No earlier attempt used ``request_id``: there is no committed reply to replay.
    new_id: bool = False
    #: For a result: the outbox entry it settles, deleted by the same commit, which is
    #: refused (:class:`AlreadySettled`) when the entry is gone, so it applies once.
    settles: str | None = None
    #: The actor cannot exist yet: activate it without reading a checkpoint.
    fresh: bool = False


@dataclass(slots=True)
class Call:
    """One call of a group (:meth:`ActorRuntime.execute_group`)."""

    msg: Message
    fn: Callable[..., Any]
    args: list[Any]
    kwargs: dict[str, Any]


@dataclass(slots=True)
class Outcome:
    """A call's reply, or the error its caller gets."""

    reply: Any = None
    error: TrothError | None = None


@dataclass(slots=True)
class Prepared:
    """What a transaction would commit; ``changed`` is False when it would write
    nothing at all (then it commits nothing)."""

    changed: bool
    state: bytes
    pstate: bytes
    ops: CommitOps
    #: The reply as the reply cache keeps it; empty for a message without request_id.
    reply: bytes


_ASYNC: dict[Any, bool] = {}
#: What most methods return: no awaitable (nothing to ask ``inspect``).
_PLAIN = frozenset({type(None), int, str, dict, list, bool, float})


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is an ``async def`` (cached per code object, so closures made
    per call do not grow the cache)."""
    func = getattr(fn, "__func__", fn)
    key = getattr(func, "__code__", func)
    found = _ASYNC.get(key)
    if found is None:
        found = _ASYNC[key] = inspect.iscoroutinefunction(fn)
    return found


class CommitHooks(Protocol):
    """The node's part in each commit of an actor."""

    def before_commit(self, ops: CommitOps) -> None:
        """Just before the commit goes to Redis (it may still be refused, and a Redis
        error may send it twice): may only change ``ops`` in ways that are the same
        whether or not it commits, and the same if done twice."""

    def after_commit(self, shard: int, ops: CommitOps) -> None:
        """Once it has committed: its effects and timers go out."""


class Invoker:
    """Runs actor code the way FastAPI runs endpoints: ``async def`` functions on the
    event loop (they must not block), plain functions on a bounded set of threads
    (:class:`~troth.core.sync_workers.SyncWorkers`), so that a sync method that blocks
    (``time.sleep``, a slow library) holds one worker and never the loop. Other
    actors' plain methods wait behind a blocking one for about 10 ms at most, until
    all ``workers`` threads are blocked at the same time."""

    def __init__(self, workers: int) -> None:
        self.workers = SyncWorkers(workers)

    async def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if is_async(fn):
            return await fn(*args, **kwargs)
        return await self.off_loop(fn, *args, **kwargs)

    async def off_loop(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run the plain function ``fn`` on a worker thread."""
        # in the message's context (log context, trace), which threads do not inherit
        context = contextvars.copy_context()
        result = await self.workers.run(lambda: context.run(fn, *args, **kwargs))
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            return await result  # a plain function that returned a coroutine
        return result

    def close(self) -> None:
        self.workers.close()


class ActorRuntime:
    """An activated actor: its instance, its plugins and its durable position."""

    def __init__(
        self,
        name: ActorName,
        shard: int,
        epoch: str,
        ca: CA,
        plugins: dict[str, ActorPlugin],
        store: CheckpointStore,
        invoke: Invoker,
        metrics: NodeMetrics,
        version: str,
        seq: int,
        hooks: CommitHooks,
        autonomous: bool = False,
        packed: tuple[bytes, bytes | None] | None = None,
    ) -> None:
        """``packed``: the state and plugin states as loaded, when ``ca.state`` and
        ``plugins`` are what they decode to (None for plugin states that must be
        packed again: one of them is no longer configured)."""
        self.name = name
        self.key = str(name)  # (its Redis keys' and log lines' name, made once)
        self._keys: tuple[str, ...] = ()  # (see _make_keys)
        self.shard = shard
        self.epoch = epoch
        self.ca = ca
        self.plugins = plugins
        self.store = store
        self.invoke = invoke
        self.metrics = metrics
        self.version = version
        self.seq = seq
        self.hooks = hooks
        self.autonomous = autonomous
        #: A brand-new actor: ``init`` runs first, in the first message's transaction,
        #: so creating an actor costs one commit, and a failed first message leaves
        #: no half-initialised checkpoint behind.
        self.needs_init = False
        #: The checkpoint must be written even if nothing changed (its state version
        #: moved on at load).
        self.needs_write = False
        #: The owner whose actor quota this actor's first commit counts against.
        self.count_for: str | None = None
        #: Set by :meth:`CA.delete_self`; the actor is gone once this commit returns.
        self.deleting = False
        self.deleted = False
        #: Set by :meth:`CA.passivate` during the last message (reset by a rollback).
        self.passivating = False
        state, pstate = packed or (None, None)
        self._state = state if state is not None else codec.pack(ca.state)
        self._pstate = pstate if pstate is not None else self._pack_pstates()
        #: The packed state ``ca.state`` is to be decoded from before the next message
        #: runs (see :meth:`_run`); None while ``ca.state`` is current.
        self._undecoded: bytes | None = None
        self._txn: TxnInfo | None = None
        #: The current call is not the first of its group (see :meth:`execute_group`) ...
        self._grouped = False
        #: ... and made a plugin that cannot be grouped: it must run again.
        self._broken = False
        ca._troth_runtime = self

    def release(self) -> None:
        """The activation ended (passivated, deleted, or its cell failed): unlink the
        actor instance from this runtime and its plugins. The instance, its state and
        its plugins are then freed at once by reference counting; left linked, each
        ended activation was a cycle only the garbage collector could free, and its
        collections grew long and frequent with the number of activations."""
        self.ca._troth_runtime = None
        self.ca.plugins.close()

    def now_ms(self) -> int:
        """The transaction's time, or the node's when none is running."""
        return self._txn.now_ms if self._txn is not None else self.store.clock.now_ms()

    def joined(self, plugin: ActorPlugin) -> None:
        """A plugin made during a transaction takes part in it from now on (one that
        cannot be grouped, made by a call that is not the first of its group, ends
        the group there)."""
        if self._grouped and not plugin.groupable:
            self._broken = True
            raise GroupBreak(f"{self.name}: plugin {type(plugin).__name__} ends the group")
        if self._txn is not None:
            plugin.begin(self._txn)

    def _pack_pstates(self) -> bytes:
        return codec.pack({n: p.pstate for n, p in self.plugins.items() if p.pstate})

    async def execute(
        self,
        msg: Message,
        fn: Callable[..., Any],
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` as one transaction; see the module docstring."""
        started = time.perf_counter()
        txn = TxnInfo(
            actor=self.name,
            seq=self.seq + 1,
            now_ms=self.store.clock.now_ms(),
            kind=msg.kind,
            method=msg.method,
            request_id=msg.request_id,
            timer=msg.timer,
        )
        self.metrics.message_counter(self.name.type, msg.kind).inc()
        try:
            reply = await self._run(txn, msg, fn, args, kwargs)
            prepared = self._prepare(msg, reply, self._state, self._pstate)
            if not prepared.changed:
                # Nothing to write. A caller is answered only while this node still
                # holds the shard (a paused node must not serve stale reads); a hook
                # or pulse that changed nothing needs no check.
                if msg.kind == "call":
                    await self._check_held()
                    # the next message gets a copy: the reply, answered later, may share
                    # objects with the state (``return self.state["items"]``)
                    self._undecoded = prepared.state
                self.metrics.reads.inc()
                return reply
            replies = [(msg.request_id, prepared.reply)] if msg.request_id is not None else []
            request = self._request(msg, prepared, replies, 1)
            await self._commit(request)
        except BaseException as exc:
            self._rollback()
            self.metrics.rollbacks.labels(self.name.type, type(exc).__name__).inc()
            raise
        finally:
            self._txn = None
        self._committed(request)
        self.metrics.message_latency.observe(time.perf_counter() - started)
        return reply

    async def execute_group(self, calls: list[Call]) -> list[Outcome]:
        """Run plain calls one after another, each a transaction of its own over the
        state the one before left, and commit all those that changed anything in one
        commit (*group commit*: a busy actor's queue costs one round trip, not one a
        message).

        What holds for one message holds for each: it sees the effects of the ones
        before it; one that fails is rolled back alone (its state, plugin state and
        buffered effects), and its caller gets its error; the checkpoint's ``seq``
        moves by one for every message that wrote. What is new: every outcome,
        success or failure, is returned only once the common commit did; if that
        commit fails, every message of the group fails with its error (a failure
        seen on state that never committed is no answer) and the actor rolls back to
        its last commit. A second call with the request_id of a call that wrote
        earlier in the group gets that call's reply, as it would from the reply cache.

        Returns the outcomes of the first calls (at least one); the rest did not run
        and go back to the mailbox: a group ends early when the actor deletes itself,
        or when a call makes a plugin that cannot be grouped (its reads would not see
        the group's uncommitted effects: that call is rolled back and runs again at
        the head of the next group). Only plugins that declare
        :attr:`~troth.core.plugin.ActorPlugin.groupable` take part in groups.
        """
        started = time.perf_counter()
        state, pstate = self._state, self._pstate  # what the calls so far left
        ops = CommitOps()
        replies: list[tuple[str, bytes]] = []
        outcomes: list[Outcome] = []
        writer_of: dict[str, int] = {}  # request_id -> outcome of the call that wrote it
        writes = reads = 0
        last: tuple[Message, Prepared] | None = None
        try:
            for i, call in enumerate(calls):
                msg = call.msg
                if i and not self.groupable():
                    break
                if msg.request_id is not None and msg.request_id in writer_of:
                    outcomes.append(outcomes[writer_of[msg.request_id]])
                    continue
                txn = TxnInfo(
                    actor=self.name,
                    seq=self.seq + writes + 1,
                    now_ms=self.store.clock.now_ms(),
                    kind=msg.kind,
                    method=msg.method,
                    request_id=msg.request_id,
                )
                self.metrics.message_counter(self.name.type, msg.kind).inc()
                logcontext.bind(self.store.node_id, self.key, msg.request_id)
                self._grouped = i > 0
                # (what a failure does comes after the ``finally``: mypyc, which
                # compiles this module, has no ``break``/``continue`` inside one)
                failed: Exception | None = None
                try:
                    reply = await self._run(txn, msg, call.fn, call.args, call.kwargs)
                    if self._broken:
                        raise GroupBreak(f"{self.name}: ends the group")
                    prepared = self._prepare(msg, reply, state, pstate)
                except Exception as exc:
                    self._rollback(state, pstate, whole=False)
                    failed = exc
                finally:
                    broken = self._broken
                    self._txn = None
                    self._grouped = self._broken = False
                if failed is not None:
                    if broken:
                        break
                    if not isinstance(failed, TrothError):  # a plugin's veto, or a bug of ours
                        log.error(
                            "%s: %s failed in a group", self.name, msg.method, exc_info=failed
                        )
                        failed = UnavailableError(f"internal error: {failed}")
                    self.metrics.rollbacks.labels(self.name.type, type(failed).__name__).inc()
                    outcomes.append(Outcome(error=failed))
                    continue
                if prepared.changed:
                    writes += 1
                    state, pstate = prepared.state, prepared.pstate
                    ops.extend(prepared.ops)
                    last = (msg, prepared)
                    if msg.request_id is not None:
                        replies.append((msg.request_id, prepared.reply))
                        writer_of[msg.request_id] = len(outcomes)
                else:
                    reads += 1
                # the next call gets a copy: a reply still waiting for the commit may
                # share objects with the state (``return self.state["items"]``)
                self._undecoded = state
                outcomes.append(Outcome(reply))
            if last is not None:
                msg, prepared = last
                prepared.ops = ops
                request = self._request(msg, prepared, replies, writes)
                await self._commit(request)
            elif reads:
                await self._check_held()
        except BaseException as exc:
            self._rollback()
            self.metrics.rollbacks.labels(self.name.type, type(exc).__name__).inc()
            raise
        if last is not None:
            self._committed(request)
        else:
            for p in self.plugins.values():
                p.committed()
        if reads:
            self.metrics.reads.inc(reads)
        if len(outcomes) > 1:
            self.metrics.grouped.inc(len(outcomes))
        elapsed = time.perf_counter() - started
        for _ in outcomes:
            self.metrics.message_latency.observe(elapsed)
        return outcomes

    def groupable(self) -> bool:
        """Whether another call may join a group: not after a ``delete_self``, and
        only while every plugin of the actor takes part in groups."""
        return not self.deleting and all(p.groupable for p in self.plugins.values())

    async def _check_held(self) -> None:
        """Refuse a reply that commits nothing unless this node still holds the shard."""
        holder = await self.store.holds(self.shard, self.epoch)
        if holder is not None:
            raise FencedError(
                f"{self.name}: this node no longer owns shard {self.shard} "
                f"(lease is {holder}); retry the call"
            )

    async def _commit(self, request: CommitRequest) -> None:
        """The commit, or the error that says why it did not happen."""
        commit_started = time.perf_counter()
        self.hooks.before_commit(request.ops)
        try:
            with tracing.span("troth.commit"):
                result = self.store.result(await self.store.send(request))
        except Exception as exc:
            raise StaleActivation(f"commit of {self.name} failed: {exc}") from exc
        self.metrics.commit_latency.observe(time.perf_counter() - commit_started)
        if result.ok and request.count_for:
            await self.store.count_new(request)
        if not result.ok:
            if result.reason == "timer":
                raise TimerAlreadyHandled(result.detail)
            if result.reason == "settled":
                raise AlreadySettled(result.detail)
            if result.reason == "started":  # see OutboxPlugin._withdraw
                raise request.ops.outbox_withdraw[result.detail]
            if result.reason == "step":  # a plugin's check refused (see CommitStep)
                n, _, why = result.detail.partition(":")
                step = request.ops.steps[int(n) - 1]
                raise step.refusal(why) if step.refusal else AppError(why)
            if result.reason == "fenced":
                raise FencedError(
                    f"{self.name}: this node no longer owns shard {self.shard} "
                    f"(lease is {result.detail}); retry the call"
                )
            raise StaleActivation(f"{self.name}: checkpoint moved to seq {result.detail}")

    def _committed(self, request: CommitRequest) -> None:
        """The commit returned: memory becomes what was committed, effects go out."""
        self.seq += request.messages
        self.needs_init = self.needs_write = False
        self.deleted = request.delete
        if not request.delete:  # a deleted actor's activation serves nothing more
            self._state = request.state
            self._pstate = request.pstate
            self._undecoded = request.state
        self.metrics.commits.inc()
        for p in self.plugins.values():
            p.committed()
        self.hooks.after_commit(self.shard, request.ops)

    async def _run(
        self,
        txn: TxnInfo,
        msg: Message,
        fn: Callable[..., Any],
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any] | None,
    ) -> Any:
        """Begin ``txn`` and run the message's code; any failure but a troth error
        becomes :class:`ActorError` (logged with its traceback)."""
        self._txn = txn
        if self._undecoded is not None:  # a fresh copy: shares nothing with past replies
            self.ca.state = codec.unpack(self._undecoded)
            self._undecoded = None
        for p in list(self.plugins.values()):
            p.begin(txn)
        self.ca.caller = msg.caller
        self.deleting = self.passivating = False
        try:
            if self.needs_init and type(self.ca).init is not CA.init:
                await self.invoke(self.ca.init)
            # (the invoker's choice, made here: a coroutine less a message)
            if is_async(fn):
                return await fn(*args, **(kwargs or {}))
            return await self.invoke.off_loop(fn, *args, **(kwargs or {}))
        except TrothError:
            raise
        except Exception as exc:
            self.ca.log.exception("%s.%s raised", self.name, msg.method)
            raise ActorError(type(exc).__name__, str(exc)) from exc

    def _prepare(
        self, msg: Message, reply: Any, state_before: bytes, pstate_before: bytes
    ) -> Prepared:
        """What this transaction would write, and whether it changed anything at all
        since ``state_before``/``pstate_before``."""
        if not isinstance(self.ca.state, dict):
            raise SerializationError(
                f"{self.name}: self.state must stay a dict, not {type(self.ca.state).__name__}"
            )
        if msg.kind == "call" and not msg.caller.builtin:
            # A reply the caller could not decode must not commit. Troth's own callers
            # (the runtime, the commitments API) take replies as Python values of
            # their own making: the check would only cost them a JSON encoding.
            check_encodable(reply, f"{self.name}.{msg.method}: reply")
        ops = CommitOps()
        for p in self.plugins.values():
            p.prepare(ops)
            if self.deleting:
                p.prepare_delete(ops)
        if self.deleting:  # the commit deletes the checkpoint: none of it is written
            state = pstate = b""
        else:
            try:
                state = codec.pack(self.ca.state)
            except SerializationError as exc:
                raise SerializationError(f"{self.name}: state {exc}") from exc
            pstate = self._pack_pstates()
        changed = not (
            state == state_before
            and pstate == pstate_before
            and ops.empty()
            and msg.timer is None
            and msg.settles is None
            and not (self.needs_init or self.needs_write or self.deleting)
        )
        packed_reply = b""
        if changed and msg.request_id is not None:  # only a reply to cache is kept
            try:
                packed_reply = codec.pack([reply])  # boxed: a None reply is still a reply
            except SerializationError as exc:
                raise SerializationError(f"{self.name}.{msg.method}: reply {exc}") from exc
        return Prepared(changed, state, pstate, ops, packed_reply)

    def _request(
        self, msg: Message, prepared: Prepared, replies: list[tuple[str, bytes]], messages: int
    ) -> CommitRequest:
        return CommitRequest(
            name=self.key,
            shard=self.shard,
            epoch=self.epoch,
            expected_seq=self.seq,
            state=prepared.state,
            pstate=prepared.pstate,
            version=self.version,
            replies=replies,
            messages=messages,
            ops=prepared.ops,
            fired_timer=(msg.timer.key, msg.timer.id) if msg.timer else None,
            settled_entry=msg.settles,
            autonomous=self.autonomous,
            delete=self.deleting,
            count_for=self.count_for if self.needs_init else None,
            keys=self._keys or self._make_keys(),
        )

    def _make_keys(self) -> tuple[str, ...]:
        """This actor's commit keys, made at its first commit (one that only reads
        never needs them)."""
        self._keys = self.store.commit_keys(self.shard, self.key)
        return self._keys

    def _rollback(
        self, state: bytes | None = None, pstate: bytes | None = None, whole: bool = True
    ) -> None:
        """Back to the last commit (``whole``), or only the current message of a group
        back to what the group's earlier calls left (``state``, ``pstate``)."""
        self.deleting = self.passivating = False
        self._undecoded = None
        self.ca.state = codec.unpack(self._state if state is None else state)
        pstates = codec.unpack(self._pstate if pstate is None else pstate)
        for name, p in list(self.plugins.items()):
            p.pstate = pstates.get(name, {})
            if whole:
                p.abort()
            else:
                p.discard()
