"""The outbox dispatcher: performs committed side effects, and keeps the ledger.

Every side effect a transaction buffers is committed as an outbox entry together
with the actor's state. After the commit, this dispatcher performs it through the
executor registered for its ``kind`` (``send``, ``http``, ...), recording
intent before each attempt and the result after it (``lua/outbox.lua``, fenced by
the shard's epoch). That record is the **activity ledger**, and it is what makes a
crash harmless:

* an entry still ``pending`` after a crash is simply attempted by the shard's next
  owner, with the same idempotency key;
* an entry found ``attempting`` had an attempt whose outcome the crash hid: it is
  attempted again with the same key when its executor is idempotent (the receiver
  de-duplicates), and otherwise marked ``uncertain`` and reported to the origin
  actor instead of being blindly repeated;
* an executor with ``records_attempts = False`` (idempotent, and nobody reads its
  attempt count: index updates) writes no intent record, only the outcome;
* an idempotent entry due at once (a ``send``, a delivery fired by an event) has
  the intent record of its first attempt in the commit that makes it, not in a
  write of its own (see :meth:`OutboxDispatcher.record_first_attempts`);
* a retryable failure is retried per the entry's retry policy; after the last
  attempt the entry is reported as failed (or kept as a ``dead`` letter).

When the entry names an ``on_result`` method, the final outcome is handed back to
the origin actor once. For a repeatable entry it goes straight to the origin as a
``result`` message whose commit also deletes the entry (and is refused if the entry
is gone), so the outcome and the end of the entry are one atomic step; a crash
before it means the attempt is repeated under its key. Otherwise, or when the
origin cannot take it now, the outcome is first recorded in the ledger
(``callback``) and then delivered as a call with a stable request id.

The dispatcher runs on the node's event loop: an attempt costs a task, not a thread,
and the ledger writes of every attempt in flight share the engine's batched round
trips (:class:`~troth.core.batcher.Batcher`). At most ``concurrency`` attempts run
at once, in as many tasks; entries due beyond that wait in a queue, first come first
served, and no task is made for them until one is free. Executors whose
``execute`` is a coroutine run on the loop; a plain one runs on a small thread pool
of the same size, so a blocking executor never stalls the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import redis
from redis.exceptions import RedisError

from troth.core import codec, logcontext, tracing
from troth.core.access import SYSTEM
from troth.core.aio import Background
from troth.core.batcher import Batcher, Command
from troth.core.clock import SYSTEM_CLOCK, Clock
from troth.core.errors import CallTimeout, RetryableError, TrothError
from troth.core.keys import KeySpace
from troth.core.metrics import NodeMetrics
from troth.core.plugin import Deliver, ExecutionOutcome, Executor
from troth.core.records import OutboxEntry
from troth.core.retry import RetryPolicy
from troth.core.scripts import Script, load_lua
from troth.core.transaction import Message
from troth.engine.due_reads import due_between, earliest_after
from troth.engine.duequeue import Due, DueQueue, Stored

log = logging.getLogger(__name__)

HISTORY_KEPT = 20
#: How late a delayed entry may start, to start with others due about then (as
#: timers: an armed commitment's delivery is a delayed entry).
OUTBOX_COALESCE_MS = 10
CALLBACK_RETRY_MS = 2000
#: Committed entries due within this long are kept in memory until they start.
KEEP_MS = 60_000


def outcome_result(entry: OutboxEntry, outcome: ExecutionOutcome | None) -> dict[str, Any]:
    """The result dict handed to the origin's ``on_result`` method."""
    return {
        "id": entry.id,
        "kind": entry.kind,
        "tag": entry.spec.get("tag"),
        "idempotency_key": entry.idempotency_key,
        "ok": bool(outcome and outcome.ok),
        "uncertain": outcome is None,
        "status_code": outcome.status_code if outcome else None,
        "error": outcome.error if outcome else "outcome unknown after a crash",
        "value": outcome.value if outcome else None,
        "attempts": entry.attempts,
        "history": entry.history,
    }


def _repeatable(executor: Executor, entry: OutboxEntry) -> bool:
    """Whether an attempt whose outcome a crash hid may simply be made again."""
    return executor.idempotent and entry.spec.get("idempotent", True) is not False


def _records_attempts(executor: Executor) -> bool:
    return bool(getattr(executor, "records_attempts", True))


class OutboxDispatcher:
    def __init__(
        self,
        *,
        client: redis.Redis,
        batcher: Batcher,
        loop: asyncio.AbstractEventLoop,
        keys: KeySpace,
        node_id: str,
        epoch_of: Callable[[int], str | None],
        deliver: Deliver,
        take_result: Callable[[str, Message], Awaitable[Any]],
        metrics: NodeMetrics,
        concurrency: int = 64,
        deliver_timeout: float = 30.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.client = client
        self.batcher = batcher
        self.loop = loop
        self.clock = clock
        self.keys = keys
        self.node_id = node_id
        self.epoch_of = epoch_of
        self.deliver = deliver
        self.take_result = take_result
        self.deliver_timeout = deliver_timeout
        self.metrics = metrics
        self.concurrency = concurrency
        self.executors: dict[str, Executor] = {}
        self._async_kinds: set[str] = set()
        self._group_kinds: set[str] = set()  # executors with execute_many
        self._script = Script(load_lua("outbox.lua"))
        #: Attempts running (each in a task), and entries waiting for one to end.
        self._running = 0
        self._backlog: deque[tuple[int, str, OutboxEntry | None]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: set[str] = set()
        #: Entries that fell due while being attempted (a retry pushed from inside the
        #: attempt, a replaceable entry replaced meanwhile): taken up again as soon as
        #: that attempt ends, never dropped, and never polled for meanwhile.
        self._again: dict[str, tuple[int, OutboxEntry | None]] = {}
        #: The version (stored bytes) of each replaceable entry being attempted.
        self._versions: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._tasks = Background()
        # Entries due now start without the queue (submit); what waits in it is delayed
        # work (index updates, retries after a back-off) that may start 50 ms late.
        self.queue = DueQueue(
            "outbox", self._due, clock, coalesce_ms=OUTBOX_COALESCE_MS, store=self
        )

    @property
    def in_flight(self) -> int:
        """Entries being attempted or handed back right now."""
        with self._lock:
            return len(self._inflight) + self.queue.handing_over

    def register(self, executor: Executor) -> None:
        self.executors[executor.kind] = executor
        if inspect.iscoroutinefunction(executor.execute):
            self._async_kinds.add(executor.kind)
        many = getattr(executor, "execute_many", None)
        if many is not None and inspect.iscoroutinefunction(many):
            if not executor.idempotent or _records_attempts(executor):
                raise ValueError(
                    f"executor {executor.kind!r}: execute_many is for idempotent executors "
                    "that record no attempts"
                )
            self._group_kinds.add(executor.kind)

    def start(self) -> None:
        self.queue.start()

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking due entries; give the attempts in flight up to ``grace`` seconds
        to end, then cancel them (an entry left ``attempting`` is settled by the
        shard's next owner, as after a crash). Called from outside the loop."""
        self.queue.stop()
        if self.loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self._close(grace), self.loop)
            try:
                done.result(timeout=grace + 5)
            except Exception:
                log.exception("outbox: stopping the attempts in flight failed")
        if self._pool is not None:
            self._pool.shutdown(wait=grace > 0, cancel_futures=True)

    async def _close(self, grace: float) -> None:
        with self._lock:  # not begun: the shard's next owner attempts them
            self._inflight.difference_update(entry_id for _, entry_id, _ in self._backlog)
        self._backlog.clear()
        tasks = self._tasks.pending()
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for task in self._tasks.pending():
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self.queue)

    def submit(self, shard: int, entries: list[OutboxEntry]) -> None:
        """Entries just committed by a transaction on this node (called on the loop).
        Those due within ``KEEP_MS`` travel with their id, so their first attempt need
        not read them back from Redis (the ledger script still refuses to write one
        that no longer exists there); one due now starts at once, without a trip
        through the due queue's thread. One due later is only its id in memory until
        then, and one due beyond the due queue's window (an armed delivery due next
        month) is not in memory at all until the window reaches it."""
        now = self.clock.now_ms()
        for e in entries:
            if e.next_ms <= now and self._claim(shard, e.id, e):
                self._begin(shard, e.id, e)
            elif e.next_ms > now:
                self.queue.push(e.next_ms, shard, e.id, e if e.next_ms - now <= KEEP_MS else None)

    def record_first_attempts(self, entries: list[OutboxEntry]) -> None:
        """Before their commit (see :class:`~troth.core.transaction.CommitHooks`): an
        entry due at once whose first attempt would begin with an intent record has
        that record in its commit instead ("attempting", attempt 1), which saves a
        ledger write per effect. Only for repeatable executors that record attempts:
        should this node die between the commit and the attempt, the shard's next
        owner attempts it again under the same key, as after any crash, and the count
        includes one attempt that may not have begun. A non-repeatable entry keeps
        its intent record just before its attempt, or such a crash would make it
        uncertain without its ever having been attempted."""
        now = self.clock.now_ms()
        for entry in entries:
            executor = self.executors.get(entry.kind)
            if (
                executor is not None
                and entry.next_ms <= now
                and entry.status == "pending"
                and entry.attempts == 0
                and _repeatable(executor, entry)
                and _records_attempts(executor)
            ):
                entry.status = "attempting"
                entry.attempts = 1

    def load_shards(self, shards: list[int]) -> None:
        self.queue.claim(shards)

    def read(self, shards: list[int], after_ms: int | None, until_ms: int) -> Stored:
        """The ids of the entries of ``shards`` due in ``(after_ms, until_ms]`` (the
        due queue's :class:`~troth.engine.duequeue.Store`): each is read whole when
        it starts."""
        found = due_between(
            self.client, [self.keys.shard(s).outbox_queue for s in shards], after_ms, until_ms
        )
        return [
            (due, shard, member.decode(), None)
            for shard, members in zip(shards, found, strict=True)
            for member, due in members
        ]

    def earliest(self, shards: list[int], after_ms: int) -> int | None:
        keys = [self.keys.shard(s).outbox_queue for s in shards]
        return earliest_after(self.client, keys, after_ms)

    def drop_shards(self, shards: set[int]) -> None:
        self.queue.drop_shards(shards)

    def _claim(self, shard: int, entry_id: str, committed: OutboxEntry | None) -> bool:
        """Mark the entry as being attempted; if it is already, mark it due again."""
        with self._lock:
            if entry_id in self._inflight:
                self._again[entry_id] = (shard, committed)
                return False
            self._inflight.add(entry_id)
            return True

    def _due(self, items: Due) -> None:
        """From the due queue's thread: hand the entries to the loop, in one hop."""
        claimed = [item for item in items if self._claim(*item)]
        if not claimed:
            return
        try:
            self.loop.call_soon_threadsafe(self._begin_all, claimed)
        except RuntimeError:  # the loop is closed: the node is stopping
            with self._lock:
                self._inflight.difference_update(entry_id for _, entry_id, _ in claimed)

    def _begin_all(self, items: Due) -> None:
        groups: dict[str, Due] = {}
        for shard, entry_id, committed in items:
            if (
                committed is not None
                and committed.kind in self._group_kinds
                and committed.on_result is None
            ):
                groups.setdefault(committed.kind, []).append((shard, entry_id, committed))
            else:
                self._begin(shard, entry_id, committed)
        for kind, group in groups.items():
            self._tasks.spawn(self._process_group(kind, group))

    async def _process_group(self, kind: str, group: Due) -> None:
        """Entries just committed of an executor with ``execute_many`` (idempotent, no
        attempt records): one call and one ledger write for all of them. Any that
        fails is attempted on its own at once, with its retries; after a Redis error,
        every one is, a little later."""
        alone: list[tuple[int, str, OutboxEntry | None]] = []
        try:
            live = [(shard, entry) for shard, _, entry in group if self.epoch_of(shard)]
            entries = [entry for _, entry in live]
            for entry in entries:
                if entry.replaceable:  # as the commit wrote it
                    self._versions[entry.id] = codec.pack(entry.to_dict())
            executor = cast(Any, self.executors[kind])
            try:
                outcomes = await executor.execute_many(entries)
            except Exception as exc:  # attempted again one by one, with retries
                log.warning("outbox: %d %s entries at once failed: %s", len(live), kind, exc)
                outcomes = [ExecutionOutcome(ok=False, retryable=True)] * len(live)
            done = [(s, e) for (s, e), o in zip(live, outcomes, strict=True) if o.ok]
            alone = [(s, e.id, e) for (s, e), o in zip(live, outcomes, strict=True) if not o.ok]
            if done:
                await self._delete(done)
                self.metrics.outbox_attempt(kind, "ok").inc(len(done))
        except RedisError as exc:  # each is read again and attempted on its own, later
            log.warning("outbox: Redis error ending %d %s entries: %s", len(group), kind, exc)
            alone = []
            for shard, entry_id, _ in group:
                self.queue.push(self.clock.now_ms() + CALLBACK_RETRY_MS, shard, entry_id)
        finally:
            # a newer version committed meanwhile begins now, in place of the old one
            renewed = {entry_id for _, entry_id, _ in group if self._ended(entry_id)}
        for shard, entry_id, entry in alone:
            if entry_id not in renewed and self._claim(shard, entry_id, entry):
                self._begin(shard, entry_id, entry)

    async def _delete(self, done: list[tuple[int, OutboxEntry]]) -> None:
        """End entries that succeeded, in one request (each fenced by its shard's epoch,
        and left alone if a newer version replaced it meanwhile)."""

        def add(commands: list[Command]) -> None:
            for shard, entry in done:
                sk = self.keys.shard(shard)
                version = self._versions.get(entry.id, b"") if entry.replaceable else b""
                args = [self.node_id, self.epoch_of(shard) or "", entry.id, b"", "", version]
                self._script.queue(commands, [sk.lease, sk.outbox, sk.outbox_queue], args)

        await self.batcher.run(add, len(done), self._script)

    def _ended(self, entry_id: str) -> bool:
        """An entry's attempt ended: let it be claimed again, and begin at once the
        version of it that fell due meanwhile, if any (True then)."""
        self._versions.pop(entry_id, None)
        with self._lock:
            self._inflight.discard(entry_id)
            again = self._again.pop(entry_id, None)
        if again is not None and self._claim(again[0], entry_id, again[1]):
            self._begin(again[0], entry_id, again[1])
            return True
        return False

    def _begin(self, shard: int, entry_id: str, committed: OutboxEntry | None) -> None:
        """Attempt a claimed entry: in a task of its own while fewer than
        ``concurrency`` run, else in turn (first come, first served) in the first task
        to finish its own. A herd of ten thousand due entries thus makes
        ``concurrency`` tasks, not one task and one waiter each."""
        if self._running < self.concurrency:
            self._running += 1
            self._tasks.spawn(self._run(shard, entry_id, committed))
        else:
            self._backlog.append((shard, entry_id, committed))

    async def _run(self, shard: int, entry_id: str, committed: OutboxEntry | None) -> None:
        try:
            while True:
                await self._process(shard, entry_id, committed)
                if not self._backlog:
                    return
                shard, entry_id, committed = self._backlog.popleft()
        finally:
            self._running -= 1

    async def _process(self, shard: int, entry_id: str, committed: OutboxEntry | None) -> None:
        try:
            await self._attempt(shard, entry_id, committed)
        except RedisError as exc:
            log.warning("outbox %s: Redis error, retrying: %s", entry_id, exc)
            self.queue.push(self.clock.now_ms() + CALLBACK_RETRY_MS, shard, entry_id)
        except Exception:
            log.exception("outbox %s: unexpected failure", entry_id)
            self.queue.push(self.clock.now_ms() + CALLBACK_RETRY_MS, shard, entry_id)
        finally:
            self._ended(entry_id)

    async def _read(self, shard: int, entry_id: str) -> OutboxEntry | None:
        key = self.keys.shard(shard).outbox

        def add(commands: list[Command]) -> None:
            commands.append(("HGET", key, entry_id))

        (raw,) = await self.batcher.results(add)
        if raw is None:
            return None
        entry = OutboxEntry.load(entry_id, raw)
        if entry.replaceable:
            self._versions[entry.id] = raw
        return entry

    async def _execute(self, executor: Executor, entry: OutboxEntry) -> ExecutionOutcome:
        if executor.kind in self._async_kinds:
            return await cast(Awaitable[ExecutionOutcome], executor.execute(entry))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="troth-outbox")
        run = cast(Callable[[OutboxEntry], ExecutionOutcome], executor.execute)
        return await self.loop.run_in_executor(self._pool, run, entry)

    async def _attempt(self, shard: int, entry_id: str, committed: OutboxEntry | None) -> None:
        epoch = self.epoch_of(shard)
        if epoch is None:
            return
        entry = committed
        if entry is None:
            entry = await self._read(shard, entry_id)
        elif entry.replaceable:  # as the commit wrote it
            self._versions[entry.id] = codec.pack(entry.to_dict())
        if entry is None or entry.status in ("dead", "uncertain"):
            return
        logcontext.bind(self.node_id, entry.origin, entry.idempotency_key)
        if entry.status == "callback":
            await self._callback(shard, epoch, entry)
            return
        executor = self.executors.get(entry.kind)
        if executor is None:
            log.error(
                "outbox %s: no executor for kind %r; kept as dead letter", entry.id, entry.kind
            )
            entry.status = "dead"
            entry.result = {"error": f"no executor for kind {entry.kind!r}"}
            await self._store(shard, epoch, entry, None)
            return
        repeatable = _repeatable(executor, entry)
        # "attempting" in memory: its commit recorded the intent (record_first_attempts)
        if committed is None or entry.status != "attempting":
            if entry.status == "attempting" and not repeatable:
                log.warning(
                    "outbox %s: outcome of attempt %d unknown; marked uncertain",
                    entry.id,
                    entry.attempts,
                )
                self.metrics.outbox_attempt(entry.kind, "uncertain").inc()
                await self._finish(shard, epoch, entry, None, repeatable)
                return
            entry.status = "attempting"
            entry.attempts += 1
            intent = not repeatable or _records_attempts(executor)
            if intent and not await self._store(shard, epoch, entry, self.clock.now_ms()):
                return
        started = time.perf_counter()
        try:
            if entry.trace is None:
                outcome = await self._execute(executor, entry)
            else:
                attributes = {"troth.outbox.entry": entry.id, "troth.actor": entry.origin}
                with tracing.span(
                    f"troth.outbox {entry.kind}", tracing.parent(entry.trace), attributes
                ):
                    outcome = await self._execute(executor, entry)
        except TrothError as exc:
            outcome = ExecutionOutcome(
                ok=False, retryable=isinstance(exc, RetryableError), error=str(exc)
            )
        except Exception as exc:
            log.exception("outbox %s: executor %s raised", entry.id, entry.kind)
            outcome = ExecutionOutcome(ok=False, retryable=True, error=repr(exc))
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        entry.history = [
            *entry.history,
            {
                "attempt": entry.attempts,
                "at_ms": self.clock.now_ms(),
                "duration_ms": duration_ms,
                "ok": outcome.ok,
                "status_code": outcome.status_code,
                "error": outcome.error,
            },
        ][-HISTORY_KEPT:]
        retryable = not outcome.ok and outcome.retryable
        policy = RetryPolicy.model_validate(entry.retry) if retryable else None
        if policy is not None and entry.attempts < policy.max_attempts:
            self.metrics.outbox_attempt(entry.kind, "retry").inc()
            entry.status = "pending"
            entry.next_ms = self.clock.now_ms() + int(
                policy.delay_before(entry.attempts + 1) * 1000
            )
            if await self._store(shard, epoch, entry, entry.next_ms):
                self.queue.push(entry.next_ms, shard, entry.id)
            return
        self.metrics.outbox_attempt(entry.kind, "ok" if outcome.ok else "failed").inc()
        await self._finish(shard, epoch, entry, outcome, repeatable)

    async def _finish(
        self,
        shard: int,
        epoch: str,
        entry: OutboxEntry,
        outcome: ExecutionOutcome | None,
        repeatable: bool,
    ) -> None:
        entry.result = outcome_result(entry, outcome)
        if entry.on_result:
            if repeatable and await self._hand_back(entry):
                return
            entry.status = "callback"
            if await self._store(shard, epoch, entry, self.clock.now_ms()):
                await self._callback(shard, epoch, entry)
        elif outcome is not None and outcome.ok:
            await self._store(shard, epoch, entry, None, delete=True)
        else:
            entry.status = "dead" if outcome is not None else "uncertain"
            log.error(
                "outbox %s (%s from %s) ended %s: %s",
                entry.id,
                entry.kind,
                entry.origin,
                entry.status,
                entry.result.get("error"),
            )
            await self._store(shard, epoch, entry, None)

    async def _hand_back(self, entry: OutboxEntry) -> bool:
        """Hand the outcome to the origin in a commit that deletes the entry; False if
        the origin cannot take it now (then it is recorded and delivered later)."""
        assert entry.on_result is not None
        msg = Message("result", entry.on_result, [entry.result], caller=SYSTEM, settles=entry.id)
        try:
            await self.take_result(entry.origin, msg)
        except TrothError as exc:
            log.info("outbox %s: result not taken now: %s", entry.id, exc)
            return False
        return True

    async def _callback(self, shard: int, epoch: str, entry: OutboxEntry) -> None:
        assert entry.on_result is not None and entry.result is not None
        try:
            await self.deliver(
                entry.origin,
                entry.on_result,
                [entry.result],
                {},
                f"{entry.id}:result",
                self.deliver_timeout,
                SYSTEM,
            )
        except (RetryableError, CallTimeout) as exc:  # same request id next time: applied once
            log.info("outbox %s: result delivery deferred: %s", entry.id, exc)
            self.queue.push(self.clock.now_ms() + CALLBACK_RETRY_MS, shard, entry.id)
            return
        except TrothError as exc:
            log.error(
                "outbox %s: %s.%s refused the result: %s",
                entry.id,
                entry.origin,
                entry.on_result,
                exc,
            )
        await self._store(shard, epoch, entry, None, delete=True)

    async def _store(
        self, shard: int, epoch: str, entry: OutboxEntry, due_ms: int | None, delete: bool = False
    ) -> bool:
        """Write the entry to the ledger (fenced by the shard's epoch); False when the
        shard was taken over, the entry is gone, or (replaceable) a newer version of it
        was committed meanwhile, which is then due in its own right."""
        sk = self.keys.shard(shard)
        packed = b"" if delete else codec.pack(entry.to_dict())
        args = [
            self.node_id,
            epoch,
            entry.id,
            packed,
            "" if due_ms is None else str(due_ms),
            self._versions.get(entry.id, b"") if entry.replaceable else b"",
        ]

        def add(commands: list[Command]) -> None:
            self._script.queue(commands, [sk.lease, sk.outbox, sk.outbox_queue], args)

        (res,) = await self.batcher.results(add, 1, self._script)
        if res == -1:
            log.info(
                "outbox %s: shard %d was taken over; leaving the entry to its owner",
                entry.id,
                shard,
            )
        if res == 1 and entry.replaceable and not delete:
            self._versions[entry.id] = packed
        return bool(res == 1)
