"""A cell: one activated actor on the engine's event loop, and its mailbox.

A cell is a few objects, not a thread: a queue of messages and the activated actor
(:class:`~troth.core.transaction.ActorRuntime`). While its mailbox is not empty one task
drains it, one message at a time and in arrival order, awaiting each message's
commit before the next message starts. That is what serializes an actor: while a
method awaits (``async def``) or runs on a worker thread (a plain ``def``), its
actor takes no other message, and every other actor keeps running.

The cell activates its actor on the first message (load, version check, ``init`` or
``upgrade`` + ``resume``). A cell that learns it is stale (fenced, its checkpoint
moved on, or a commit whose outcome is unknown) stops serving: it fails every
message still queued with a retryable error and asks the engine to forget it, so
that the next call activates a fresh cell from the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from troth.core import aio, logcontext, tracing
from troth.core.actor import CA, Plugins
from troth.core.catalog import ActorType
from troth.core.checkpoint import CheckpointStore
from troth.core.errors import (
    ActivationError,
    AppError,
    BadRequestError,
    NotFoundError,
    QuotaExceeded,
    RedisUnavailable,
    RetryableError,
    TrothError,
    UnavailableError,
)
from troth.core.metrics import NodeMetrics
from troth.core.names import ActorName
from troth.core.plugin import ActorPlugin, PluginFactory
from troth.core.records import Checkpoint
from troth.core.transaction import (
    ActorRuntime,
    AlreadySettled,
    Call,
    CommitHooks,
    Invoker,
    Message,
    Outcome,
    StaleActivation,
    TimerAlreadyHandled,
)
from troth.core.versioning import Decision, decide
from troth.engine.quotas import Quotas

log = logging.getLogger(__name__)


class ArgumentCheck:
    """Whether a call's arguments fit a method, checked before the transaction starts
    (a misfit is the caller's 422, not the actor's bug). ``Signature.bind`` costs
    more than a small message; the plain shapes of almost every method are checked
    by set arithmetic, and ``bind`` only words the refusal or handles ``*args``."""

    __slots__ = ("names", "positional", "required", "signature", "simple")

    def __init__(self, signature: inspect.Signature) -> None:
        params = list(signature.parameters.values())
        kinds = {p.kind for p in params}
        self.signature = signature
        self.simple = kinds <= {P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY}
        self.positional = [p.name for p in params if p.kind is P.POSITIONAL_OR_KEYWORD]
        self.names = frozenset(p.name for p in params)
        self.required = frozenset(p.name for p in params if p.default is P.empty)

    def __call__(self, args: list[Any] | tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise TypeError (with Python's own wording) unless the arguments fit."""
        if self.simple and len(args) <= len(self.positional):
            given = self.positional[: len(args)]
            if (
                kwargs.keys() <= self.names
                and not kwargs.keys() & given
                and self.required <= kwargs.keys() | set(given)
            ):
                return
        self.signature.bind(*args, **kwargs)


P = inspect.Parameter
_CHECKS: dict[tuple[type, str], ArgumentCheck] = {}


def argument_check(cls: type, method: str) -> ArgumentCheck:
    """The check for ``method`` as called on an instance, made once per class and method."""
    check = _CHECKS.get((cls, method))
    if check is None:
        sig = inspect.signature(getattr(cls, method))
        if not isinstance(inspect.getattr_static(cls, method), staticmethod | classmethod):
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        check = _CHECKS[(cls, method)] = ArgumentCheck(sig)
    return check


@dataclass(slots=True)
class Envelope:
    message: Message
    future: asyncio.Future[Any] | None = None
    #: The sender's trace context (None while tracing is off), for the message's span.
    trace: Any = None


class CellHost(CommitHooks, Protocol):
    """What a cell needs from its engine."""

    #: The most calls one group commit takes (``runtime.group_commit_max``).
    group_max: int
    store: CheckpointStore
    invoke: Invoker
    metrics: NodeMetrics
    plugin_factories: dict[str, PluginFactory]
    quotas: Quotas

    def cell_stopped(self, cell: Cell) -> None: ...

    def touched(self, cell: Cell) -> None: ...


class Cell:
    __slots__ = (
        "atype",
        "epoch",
        "failure",
        "host",
        "key",
        "last_active",
        "mailbox",
        "name",
        "next_pulse",
        "pulse_queued",
        "runtime",
        "shard",
        "task",
    )

    def __init__(
        self, host: CellHost, name: ActorName, shard: int, epoch: str, atype: ActorType
    ) -> None:
        self.host = host
        self.name = name
        #: ``str(name)``: the engine's key for this cell (made once, used per message).
        self.key = str(name)
        self.shard = shard
        self.epoch = epoch
        self.atype = atype
        self.mailbox: deque[Envelope] = deque()
        self.runtime: ActorRuntime | None = None
        self.failure: TrothError | None = None
        self.task: asyncio.Task[None] | None = None
        self.pulse_queued = False
        self.next_pulse = 0.0
        self.last_active = host.store.clock.monotonic()

    # -- the engine's side --------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self.mailbox)

    @property
    def idle_for(self) -> float:
        busy = self.mailbox or (self.task is not None and not self.task.done())
        return 0.0 if busy else self.host.store.clock.monotonic() - self.last_active

    def post(self, envelope: Envelope) -> None:
        if envelope.message.kind == "pulse":
            self.pulse_queued = True
        self.mailbox.append(envelope)
        if self.task is None or self.task.done():
            self.task = aio.start(self._drain())

    async def stop(self) -> None:
        """Stop after the messages already queued have run (the engine has already
        forgotten this cell, so no new message reaches it)."""
        if self.task is not None and not self.task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self.task)
        self._close()

    def _close(self) -> None:
        if self.runtime is not None:
            for plugin in self.runtime.plugins.values():
                plugin.abort()
            self.runtime.release()
            self.runtime = None

    # -- the cell's own task -------------------------------------------------------------

    async def _drain(self) -> None:
        while self.mailbox:
            if self._groups():
                await self._drain_group()
                continue
            envelope = self.mailbox.popleft()
            msg = envelope.message
            logcontext.bind(self.host.store.node_id, self.key, msg.request_id)
            try:
                if envelope.trace is None:
                    reply = await self._handle(msg)
                else:
                    with tracing.span(
                        f"{self.name.type}.{msg.method}",
                        envelope.trace,
                        {"troth.actor": self.key, "troth.kind": msg.kind},
                    ):
                        reply = await self._handle(msg)
            except BaseException as exc:
                self._settle(envelope, error=self._error_of(exc, f"a {msg.kind}"))
                if not isinstance(exc, Exception):
                    raise
            else:
                self._settle(envelope, reply=reply)
            if self.runtime is not None and self.runtime.deleted:
                self._fail(UnavailableError(f"{self.name} was deleted; call again"))
        rt = self.runtime
        if rt is None:
            return
        if self.failure is not None:
            self._close()  # (it failed while a message ran: see _fail)
            return
        if rt.needs_init or (rt.passivating and not self.atype.autonomous):
            # Nothing of this actor was ever committed (its first messages were refused
            # or rolled back, e.g. a duplicate creation), or it asked to be let go
            # (CA.passivate): it holds no memory while it waits to be idle.
            self.host.cell_stopped(self)
            self._close()

    def _groups(self) -> bool:
        """Whether the next calls in the mailbox may be committed together: plain
        calls (not traced: a span each) to an activated actor whose plugins all take
        part in groups."""
        rt, box = self.runtime, self.mailbox
        return (
            len(box) > 1
            and self.host.group_max > 1
            and rt is not None
            and self.failure is None
            and not (rt.needs_init or rt.needs_write)
            and _groupable(box[0])
            and _groupable(box[1])
            and rt.groupable()
        )

    async def _drain_group(self) -> None:
        """Run the queued calls at the head of the mailbox as one group commit
        (:meth:`ActorRuntime.execute_group`), and answer each once it committed."""
        rt = self.runtime
        assert rt is not None
        group: list[Envelope] = []
        while self.mailbox and len(group) < self.host.group_max and _groupable(self.mailbox[0]):
            group.append(self.mailbox.popleft())
        waiting: list[Envelope] = []
        calls: list[Call] = []
        resolving = 0
        try:
            for i, envelope in enumerate(group):
                resolving = i  # a failure settles this one and those after it
                try:
                    resolved = await self._resolve(rt, envelope.message)
                except TrothError as exc:
                    self._settle(envelope, error=exc)
                    continue
                if isinstance(resolved, Outcome):  # a committed reply, replayed
                    self._settle(envelope, reply=resolved.reply)
                else:
                    waiting.append(envelope)
                    calls.append(resolved)
            resolving = len(group)
            outcomes = await rt.execute_group(calls) if calls else []
        except BaseException as exc:
            error = self._error_of(exc, "a group of calls")
            for envelope in [*waiting, *group[resolving:]]:
                self._settle(envelope, error=error)
            if not isinstance(exc, Exception):
                raise
            return
        for envelope, outcome in zip(waiting, outcomes, strict=False):
            self._settle(envelope, reply=outcome.reply, error=outcome.error)
        self.mailbox.extendleft(reversed(waiting[len(outcomes) :]))  # they did not run
        if rt.deleted:
            self._fail(UnavailableError(f"{self.name} was deleted; call again"))

    def _error_of(self, exc: BaseException, what: str) -> TrothError:
        """The error a caller gets for ``exc``, raised while handling ``what`` (one
        message, or a group of calls: each gets it); the cell stops serving when it
        must (its activation is stale, Redis failed, or the error says retry)."""
        if isinstance(exc, StaleActivation):
            error: TrothError = UnavailableError(str(exc))
            self._fail(error)
        elif isinstance(exc, RetryableError):
            self._fail(exc)
            error = exc
        elif isinstance(exc, TrothError):
            error = exc
        elif isinstance(exc, redis.RedisError):
            error = RedisUnavailable(f"{self.name}: Redis unavailable: {exc}")
            self._fail(error)
        elif isinstance(exc, asyncio.CancelledError):
            error = UnavailableError(f"{self.name}: stopped")
        else:
            log.exception("%s: internal error handling %s", self.name, what)
            error = UnavailableError(f"internal error: {exc}")
        return error

    def _settle(
        self, envelope: Envelope, reply: Any = None, error: TrothError | None = None
    ) -> None:
        if envelope.message.kind == "pulse":
            self.pulse_queued = False
        self.last_active = self.host.store.clock.monotonic()
        self.host.touched(self)
        fut = envelope.future
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(reply)
            else:
                fut.set_exception(error)
        elif error is not None and not isinstance(
            error, AppError | TimerAlreadyHandled | AlreadySettled
        ):
            log.warning(
                "%s: %s %s failed: %s",
                self.name,
                envelope.message.kind,
                envelope.message.method,
                error.to_dict(),
            )

    def _handle(self, msg: Message) -> Awaitable[Any]:
        """What handling ``msg`` takes, to be awaited: for an active actor, the
        transaction's own coroutine (no frame of the cell's held while its commit is
        in flight, which with thousands of messages in flight costs more than the
        call). A failure is raised or comes with the awaiting; see :meth:`_error_of`."""
        if self.failure is not None:
            raise self.failure
        rt = self.runtime
        if rt is None:
            return self._activate_then(msg)
        if msg.kind == "call":
            if msg.request_id is not None and not msg.new_id:
                return self._call(rt, msg)
            return rt.execute(msg, self._method(rt, msg), msg.args, msg.kwargs)
        if msg.kind == "pulse":
            return rt.execute(msg, rt.ca.pulse)
        if msg.kind == "timer":
            return self._fire(rt, msg)
        if msg.kind == "result":
            return self._take_result(rt, msg)
        if msg.kind == "delete":  # an operator's order: the actor's last transaction
            return self._delete(rt, msg)
        raise BadRequestError(f"unknown message kind {msg.kind!r}")

    async def _activate_then(self, msg: Message) -> Any:
        try:
            self.runtime = await self._activate(msg.fresh)
        except TrothError as exc:
            keep = isinstance(exc, RetryableError | QuotaExceeded)
            self._fail(exc if keep else ActivationError(str(exc)))
            raise
        return await self._handle(msg)

    async def _call(self, rt: ActorRuntime, msg: Message) -> Any:
        """A call whose request id an earlier attempt may have used: its committed
        reply, if there is one; else the call."""
        assert msg.request_id is not None
        prior = await self._replayed(msg.request_id)
        if prior is not None:
            return prior[0]
        return await rt.execute(msg, self._method(rt, msg), msg.args, msg.kwargs)

    async def _resolve(self, rt: ActorRuntime, msg: Message) -> Call | Outcome:
        """The call to run, or the reply committed for its ``request_id`` earlier;
        raises for an unknown method or arguments that do not fit it."""
        if msg.request_id is not None and not msg.new_id:
            prior = await self._replayed(msg.request_id)
            if prior is not None:
                return Outcome(prior[0])
        return Call(msg, self._method(rt, msg), msg.args, msg.kwargs)

    async def _replayed(self, request_id: str) -> tuple[Any] | None:
        """``(reply,)`` as committed earlier for ``request_id``, or None."""
        prior = await self.host.store.committed_reply(self.shard, self.key, request_id)
        if prior is not None:
            self.host.metrics.dedup_hits.inc()
        return prior

    def _method(self, rt: ActorRuntime, msg: Message) -> Callable[..., Any]:
        """The actor's method ``msg`` calls; raises for an unknown method or arguments
        that do not fit it."""
        fn: Callable[..., Any] | None = getattr(rt.ca, msg.method, None)
        if fn is None:
            raise NotFoundError(f"{self.name.type} has no public method {msg.method!r}")
        try:
            argument_check(type(rt.ca), msg.method)(msg.args, msg.kwargs)
        except TypeError as exc:
            raise BadRequestError(f"{self.name.type}.{msg.method}: {exc}") from None
        return fn

    async def _delete(self, rt: ActorRuntime, msg: Message) -> bool:
        """Delete the actor in a transaction of its own; False (and nothing written,
        no ``init`` run) when it has no checkpoint."""
        if rt.needs_init:
            return False
        await rt.execute(msg, rt.ca.delete_self)
        return True

    async def _fire(self, rt: ActorRuntime, msg: Message) -> Any:
        timer = msg.timer
        assert timer is not None
        lateness = max(0.0, (rt.store.clock.now_ms() - timer.due_ms) / 1000)
        what = f"timer {timer.name!r} handler {timer.method}"
        done = await self._consuming(rt, msg, timer.args, timer.kwargs, what)
        if done:
            self.host.metrics.timers_fired.inc()
            self.host.metrics.timer_lateness.observe(lateness)
        return None

    async def _take_result(self, rt: ActorRuntime, msg: Message) -> Any:
        await self._consuming(rt, msg, msg.args, msg.kwargs, f"result handler {msg.method}")
        return None

    async def _consuming(
        self,
        rt: ActorRuntime,
        msg: Message,
        args: list[Any],
        kwargs: dict[str, Any],
        what: str,
    ) -> bool:
        """Run a message that consumes a token in its commit (a timer, an outbox
        entry), once: True if its handler committed. A handler that fails still
        consumes the token, with the state unchanged, or the token would come back at
        once, forever; the failure is logged."""
        fn = getattr(rt.ca, msg.method, None)
        try:
            if not callable(fn):
                raise NotFoundError(f"{self.name.type} has no method {msg.method!r}")
            await rt.execute(msg, fn, args, kwargs)
            return True
        except (TimerAlreadyHandled, AlreadySettled):
            return False
        except RetryableError:
            raise
        except TrothError as exc:
            log.error("%s: %s failed: %s", self.name, what, exc)
            consume = Message(msg.kind, "<consume>", timer=msg.timer, settles=msg.settles)
            with contextlib.suppress(TimerAlreadyHandled, AlreadySettled):
                await rt.execute(consume, _nothing)
            return False

    async def _activate(self, fresh: bool = False) -> ActorRuntime:
        host, name = self.host, self.key
        owner = self.name.owner if self.atype.counted else None
        if fresh and owner is None:  # see Engine.call (the quota count needs a read)
            stored, created = None, 0
        else:
            stored, created = await host.store.load(self.shard, name, owner)
        pstates = stored.pstate if stored else {}
        plugins = {  # the others are made on first use
            pname: host.plugin_factories[pname].for_actor(self.name, pstate)
            for pname, pstate in pstates.items()
            if pstate and pname in host.plugin_factories
        }
        rt_ref: list[ActorRuntime] = []
        ca = self.atype.cls(
            self.name,
            Plugins(self.name, host.plugin_factories, plugins, lambda p: rt_ref[0].joined(p)),
        )
        version = self.atype.state_version

        def runtime(seq: int, packed: tuple[bytes, bytes | None] | None = None) -> ActorRuntime:
            return ActorRuntime(
                self.name,
                self.shard,
                self.epoch,
                ca,
                plugins,
                host.store,
                host.invoke,
                host.metrics,
                version,
                seq,
                host,
                self.atype.autonomous,
                packed,
            )

        if stored is None:
            if owner:
                self.host.quotas.check_new_actor(owner, created)
            rt = runtime(0)
            rt_ref.append(rt)
            rt.needs_init = True  # init runs inside the first message's transaction
            rt.count_for = owner
            return rt
        decision = decide(name, stored.version, version, self.atype.has_upgrade)
        ca.state = stored.state
        # The loaded bytes are the baseline a change is found against; the plugin
        # states' only while every one of them was loaded (none dropped).
        whole = stored.packed_pstate and len(plugins) == sum(1 for v in pstates.values() if v)
        rt = runtime(stored.seq, (stored.packed_state, stored.packed_pstate if whole else None))
        rt_ref.append(rt)
        rt.needs_write = stored.version != version
        if not (
            decision is Decision.UPGRADE
            or rt.needs_write
            or type(ca).resume is not CA.resume
            or any(type(p).resume is not ActorPlugin.resume for p in plugins.values())
        ):
            return rt  # no hook to run and nothing to write: no resume transaction
        checkpoint = Checkpoint(
            version=stored.version,
            seq=stored.seq,
            created_ms=stored.created_ms,
            updated_ms=stored.updated_ms,
            upgraded_from=stored.version if decision is Decision.UPGRADE else None,
        )

        async def resume() -> None:
            if decision is Decision.UPGRADE:
                await host.invoke(ca.upgrade, stored.version, version)  # type: ignore[attr-defined]
            for plugin in plugins.values():
                plugin.resume(checkpoint)
            if type(ca).resume is not CA.resume:  # the no-op default costs no hand-off
                await host.invoke(ca.resume, checkpoint)

        try:
            await rt.execute(Message("resume", "resume"), resume)
        except RetryableError:
            raise
        except TrothError as exc:
            raise ActivationError(f"{self.name}: resume failed: {exc}") from exc
        return rt

    def _fail(self, error: TrothError) -> None:
        """Stop serving: fail what is queued, and let the engine forget this cell.

        A message running now (its shard was lost meanwhile) runs on to its end, and
        its commit is refused: its actor and plugins are let go after it, by the
        cell's task, so that it fails as the caller can retry, not on a plugin it
        can no longer make."""
        if self.failure is not None:
            return
        self.failure = error
        self.host.cell_stopped(self)
        while self.mailbox:
            self._settle(self.mailbox.popleft(), error=error)
        if self.task is None or self.task.done() or self.task is asyncio.current_task():
            self._close()


async def _nothing() -> None:
    return None


def _groupable(envelope: Envelope) -> bool:
    return envelope.message.kind == "call" and envelope.trace is None
