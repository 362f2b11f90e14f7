"""A cell: the pykka actor that hosts one activated CA.

pykka gives each cell a thread and a mailbox, which is what serializes an actor's
messages: one message runs (and commits) at a time, in arrival order. The cell
activates its CA lazily on the first message (load, version check, ``init`` or
``upgrade`` + ``resume``), runs each message as a transaction, and answers the
message's future only after the commit.

A cell that learns it is stale (fenced, its checkpoint moved on, or a commit
whose outcome is unknown) stops serving: it fails every message still queued
with a retryable error and asks the node to forget it, so that the next call
activates a fresh cell from the checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import pykka
import redis

from .actor import Checkpoint, Plugins
from .catalog import ActorType
from .checkpoint import CheckpointStore, now_ms
from .committer import GroupCommitter
from .errors import (
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
from .metrics import NodeMetrics
from .names import ActorName
from .plugin import CommitOps, PluginFactory
from .quotas import Quotas
from .transaction import ActorRuntime, Message, StaleActivation, TimerAlreadyHandled
from .versioning import Decision, decide

log = logging.getLogger(__name__)


_SIGNATURES: dict[tuple[type, str], inspect.Signature] = {}


def signature_of(cls: type, method: str) -> inspect.Signature:
    """The signature as called on an instance, computed once per class and method."""
    sig = _SIGNATURES.get((cls, method))
    if sig is None:
        sig = inspect.signature(getattr(cls, method))
        if not isinstance(inspect.getattr_static(cls, method), staticmethod | classmethod):
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        _SIGNATURES[(cls, method)] = sig
    return sig


@dataclass(slots=True)
class Envelope:
    message: Message
    future: Future[Any] | None = None
    enqueued: float = field(default_factory=time.monotonic)


class CellHost(Protocol):
    """What a cell needs from its node."""

    store: CheckpointStore
    committer: GroupCommitter
    metrics: NodeMetrics
    plugin_factories: dict[str, PluginFactory]
    quotas: Quotas

    def after_commit(self, shard: int, ops: CommitOps) -> None: ...

    def cell_stopped(self, handle: CellHandle) -> None: ...


class CellHandle:
    """The node's view of an active cell: its address, mailbox count and pulse clock.

    Kept apart from the pykka actor so the node can read it from any thread; the
    counters are guarded by the handle's own lock.
    """

    def __init__(self, name: ActorName, shard: int, epoch: str, atype: ActorType) -> None:
        self.name = name
        self.shard = shard
        self.epoch = epoch
        self.atype = atype
        self.queued = 0
        self.pulse_queued = False
        self.next_pulse = 0.0
        self.last_active = time.monotonic()
        self.lock = threading.Lock()
        self.ref: pykka.ActorRef[Cell] | None = None

    def post(self, envelope: Envelope) -> None:
        assert self.ref is not None
        with self.lock:
            self.queued += 1
            if envelope.message.kind == "pulse":
                self.pulse_queued = True
        self.ref.tell(envelope)

    def settled(self, kind: str) -> None:
        with self.lock:
            self.queued -= 1
            if kind == "pulse":
                self.pulse_queued = False
        self.last_active = time.monotonic()

    @property
    def idle_for(self) -> float:
        return 0.0 if self.queued else time.monotonic() - self.last_active

    def stop(self) -> pykka.Future[Any] | None:
        """Stop after the messages already queued (never blocks)."""
        return self.ref.stop(block=False) if self.ref is not None else None


class Cell(pykka.ThreadingActor):
    #: Everything a cell has committed is in Redis; a cell still winding down when the
    #: node exits (after the drain deadline) must not keep the process alive.
    use_daemon_thread = True

    def __init__(self, host: CellHost, handle: CellHandle) -> None:
        super().__init__()
        self.host = host
        self.handle = handle
        self.name = handle.name
        self.shard = handle.shard
        self.epoch = handle.epoch
        self.atype = handle.atype
        self.runtime: ActorRuntime | None = None
        self.failure: TrothError | None = None

    @classmethod
    def spawn(cls, host: CellHost, handle: CellHandle) -> CellHandle:
        handle.ref = cls.start(host, handle)
        return handle

    # -- the cell's own thread -------------------------------------------------------

    def on_receive(self, envelope: Any) -> None:
        if not isinstance(envelope, Envelope):
            return
        msg = envelope.message
        try:
            reply = self._handle(msg)
        except TrothError as exc:
            self._settle(envelope, error=exc)
        except redis.RedisError as exc:
            # Loading or a de-duplication lookup failed: nothing ran. Start afresh next time.
            self._fail(RedisUnavailable(f"{self.name}: Redis unavailable: {exc}"))
            self._settle(envelope, error=self.failure)
        except Exception as exc:  # a bug in troth itself: never kill the cell silently
            log.exception("%s: internal error handling %s", self.name, msg.kind)
            self._settle(envelope, error=UnavailableError(f"internal error: {exc}"))
        else:
            self._settle(envelope, reply=reply)

    def _settle(
        self, envelope: Envelope, reply: Any = None, error: TrothError | None = None
    ) -> None:
        self.handle.settled(envelope.message.kind)
        fut = envelope.future
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(reply)
            else:
                fut.set_exception(error)
        elif error is not None and not isinstance(error, AppError | TimerAlreadyHandled):
            log.warning(
                "%s: %s %s failed: %s",
                self.name,
                envelope.message.kind,
                envelope.message.method,
                error.to_dict(),
            )

    def _handle(self, msg: Message) -> Any:
        if self.failure is not None:
            raise self.failure
        if self.runtime is None:
            try:
                self.runtime = self._activate()
            except TrothError as exc:
                keep = isinstance(exc, RetryableError | QuotaExceeded)
                self._fail(exc if keep else ActivationError(str(exc)))
                raise
        rt = self.runtime
        new = rt.needs_init
        try:
            if msg.kind == "call":
                reply = self._call(rt, msg)
            elif msg.kind == "pulse":
                reply = rt.execute(msg, rt.ca.pulse)
            elif msg.kind == "timer":
                reply = self._fire(rt, msg)
            else:
                raise BadRequestError(f"unknown message kind {msg.kind!r}")
            if new and not rt.needs_init and self.atype.counted and self.name.owner:
                with contextlib.suppress(redis.RedisError):  # a count, after the commit
                    self.host.quotas.actor_created(self.name.owner)
            return reply
        except StaleActivation as exc:
            error = UnavailableError(str(exc))
            self._fail(error)
            raise error from exc
        except RetryableError as exc:
            self._fail(exc)
            raise

    def _call(self, rt: ActorRuntime, msg: Message) -> Any:
        if msg.request_id is not None:
            prior = self.host.store.committed_reply(self.shard, str(self.name), msg.request_id)
            if prior is not None:
                self.host.metrics.dedup_hits.inc()
                return prior[0]
        fn = getattr(rt.ca, msg.method, None)
        if fn is None:
            raise NotFoundError(f"{self.name.type} has no public method {msg.method!r}")
        try:
            signature_of(type(rt.ca), msg.method).bind(*msg.args, **msg.kwargs)
        except TypeError as exc:
            raise BadRequestError(f"{self.name.type}.{msg.method}: {exc}") from None
        return rt.execute(msg, lambda: fn(*msg.args, **msg.kwargs))

    def _fire(self, rt: ActorRuntime, msg: Message) -> Any:
        timer = msg.timer
        assert timer is not None
        fn = getattr(rt.ca, timer.method, None)
        if not callable(fn):
            raise NotFoundError(f"timer {timer.name!r}: no method {timer.method!r}")
        lateness = max(0.0, (now_ms() - timer.due_ms) / 1000)
        try:
            reply = rt.execute(msg, lambda: fn(*timer.args, **timer.kwargs))
        except TimerAlreadyHandled:
            return None
        except RetryableError:
            raise
        except TrothError as exc:
            # The handler failed: consume the timer anyway (state unchanged), or it
            # would fire again at once, forever. The failure is logged.
            log.error(
                "%s: timer %r handler %s failed: %s", self.name, timer.name, timer.method, exc
            )
            with contextlib.suppress(TimerAlreadyHandled):
                rt.execute(Message("timer", "<consume>", timer=timer), lambda: None)
            return None
        self.host.metrics.timers_fired.inc()
        self.host.metrics.timer_lateness.observe(lateness)
        return reply

    def _activate(self) -> ActorRuntime:
        host, name = self.host, str(self.name)
        stored = host.store.load(self.shard, name)
        pstates = stored.pstate if stored else {}
        plugins = {
            pname: factory.for_actor(self.name, pstates.get(pname, {}))
            for pname, factory in host.plugin_factories.items()
        }
        ca = self.atype.cls(self.name, Plugins(plugins))
        version = self.atype.state_version

        def runtime(seq: int) -> ActorRuntime:
            return ActorRuntime(
                self.name,
                self.shard,
                self.epoch,
                ca,
                plugins,
                host.committer,
                host.metrics,
                version,
                seq,
                host.after_commit,
                self.atype.autonomous,
            )

        if stored is None:
            if self.atype.counted and self.name.owner:
                self.host.quotas.check_new_actor(self.name.owner)
            rt = runtime(0)
            rt.needs_init = True  # init runs inside the first message's transaction
            return rt
        decision = decide(name, stored.version, version, self.atype.has_upgrade)
        ca.state = stored.state
        rt = runtime(stored.seq)
        checkpoint = Checkpoint(
            version=stored.version,
            seq=stored.seq,
            created_ms=stored.created_ms,
            updated_ms=stored.updated_ms,
            upgraded_from=stored.version if decision is Decision.UPGRADE else None,
        )

        def resume() -> None:
            if decision is Decision.UPGRADE:
                ca.upgrade(stored.version, version)  # type: ignore[attr-defined]
            for plugin in plugins.values():
                plugin.resume(checkpoint)
            ca.resume(checkpoint)

        self._run_hook(rt, "resume", resume)
        return rt

    def _run_hook(self, rt: ActorRuntime, hook: str, fn: Any) -> None:
        try:
            rt.execute(Message(hook, hook), fn)
        except RetryableError:
            raise
        except TrothError as exc:
            raise ActivationError(f"{self.name}: {hook} failed: {exc}") from exc

    def _fail(self, error: TrothError) -> None:
        """Stop serving: fail what is queued, and let the node forget this cell."""
        if self.failure is None:
            self.failure = error
            self.host.cell_stopped(self.handle)
            self.actor_ref.stop(block=False)

    def on_stop(self) -> None:
        if self.runtime is not None:
            for plugin in self.runtime.plugins.values():
                plugin.abort()
