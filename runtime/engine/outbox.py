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
* a retryable failure is retried per the entry's retry policy; after the last
  attempt the entry is reported as failed (or kept as a ``dead`` letter).

When the entry names an ``on_result`` method, the final outcome is delivered to the
origin actor as a call with a stable request id, so the actor processes it once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from troth.core import codec
from troth.core.access import SYSTEM, Caller
from troth.core.clock import SYSTEM_CLOCK, Clock
from troth.core.errors import CallTimeout, RetryableError, TrothError
from troth.core.keys import KeySpace
from troth.core.metrics import NodeMetrics
from troth.core.plugin import ExecutionOutcome, Executor
from troth.core.records import OutboxEntry
from troth.core.retry import RetryPolicy
from troth.core.scripts import load_lua
from troth.engine.duequeue import DueQueue

log = logging.getLogger(__name__)

HISTORY_KEPT = 20
CALLBACK_RETRY_MS = 2000


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


class OutboxDispatcher:
    def __init__(
        self,
        client: redis.Redis,
        keys: KeySpace,
        node_id: str,
        epoch_of: Callable[[int], str | None],
        deliver: Callable[[str, str, list[Any], dict[str, Any], str, float, Caller], Any],
        metrics: NodeMetrics,
        workers: int = 16,
        deliver_timeout: float = 30.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.client = client
        self.clock = clock
        self.keys = keys
        self.node_id = node_id
        self.epoch_of = epoch_of
        self.deliver = deliver
        self.deliver_timeout = deliver_timeout
        self.metrics = metrics
        self.executors: dict[str, Executor] = {}
        self._write = client.register_script(load_lua("outbox.lua"))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="troth-outbox")
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self.queue = DueQueue("outbox", self._due, clock)

    @property
    def in_flight(self) -> int:
        """Entries being attempted or handed back right now."""
        with self._lock:
            return len(self._inflight) + self.queue.handing_over

    def register(self, executor: Executor) -> None:
        self.executors[executor.kind] = executor

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __len__(self) -> int:
        return len(self.queue)

    def submit(self, shard: int, entries: list[OutboxEntry]) -> None:
        """Entries just committed by a transaction on this node. They travel with their
        id, so their first attempt need not read them back from Redis (the ledger
        script still refuses to write one that no longer exists there)."""
        for e in entries:
            self.queue.push(e.next_ms, shard, e.id, e)

    def load_shards(self, shards: list[int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for s in shards:
            pipe.zrange(self.keys.shard(s).outbox_queue, 0, -1, withscores=True)
        for shard, items in zip(shards, pipe.execute(), strict=True):
            for member, score in items:
                self.queue.push(int(score), shard, member.decode())

    def drop_shards(self, shards: set[int]) -> None:
        self.queue.drop_shards(shards)

    def _due(self, shard: int, entry_id: str, committed: OutboxEntry | None) -> None:
        with self._lock:
            if entry_id in self._inflight:
                return
            self._inflight.add(entry_id)
        self._pool.submit(self._process, shard, entry_id, committed)

    def _process(self, shard: int, entry_id: str, committed: OutboxEntry | None) -> None:
        try:
            self._attempt(shard, entry_id, committed)
        except redis.RedisError as exc:
            log.warning("outbox %s: Redis error, retrying: %s", entry_id, exc)
            self.queue.push(self.clock.now_ms() + CALLBACK_RETRY_MS, shard, entry_id)
        except Exception:
            log.exception("outbox %s: unexpected failure", entry_id)
            self.queue.push(self.clock.now_ms() + CALLBACK_RETRY_MS, shard, entry_id)
        finally:
            with self._lock:
                self._inflight.discard(entry_id)

    def _attempt(self, shard: int, entry_id: str, committed: OutboxEntry | None) -> None:
        epoch = self.epoch_of(shard)
        if epoch is None:
            return
        entry = committed
        if entry is None:
            raw = self.client.hget(self.keys.shard(shard).outbox, entry_id)
            if raw is None:
                return
            entry = OutboxEntry.from_dict(codec.unpack(raw))
        if entry.status in ("dead", "uncertain"):
            return
        if entry.status == "callback":
            self._callback(shard, epoch, entry)
            return
        executor = self.executors.get(entry.kind)
        if executor is None:
            log.error(
                "outbox %s: no executor for kind %r; kept as dead letter", entry.id, entry.kind
            )
            entry.status = "dead"
            entry.result = {"error": f"no executor for kind {entry.kind!r}"}
            self._store(shard, epoch, entry, None)
            return
        repeatable = executor.idempotent and entry.spec.get("idempotent", True) is not False
        if entry.status == "attempting" and not repeatable:
            log.warning(
                "outbox %s: outcome of attempt %d unknown; marked uncertain",
                entry.id,
                entry.attempts,
            )
            self.metrics.outbox_attempts.labels(entry.kind, "uncertain").inc()
            self._finish(shard, epoch, entry, None)
            return
        entry.status = "attempting"
        entry.attempts += 1
        if not self._store(shard, epoch, entry, self.clock.now_ms()):
            return
        started = time.perf_counter()
        try:
            outcome = executor.execute(entry)
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
        policy = RetryPolicy.model_validate(entry.retry)
        if not outcome.ok and outcome.retryable and entry.attempts < policy.max_attempts:
            self.metrics.outbox_attempts.labels(entry.kind, "retry").inc()
            entry.status = "pending"
            entry.next_ms = self.clock.now_ms() + int(
                policy.delay_before(entry.attempts + 1) * 1000
            )
            if self._store(shard, epoch, entry, entry.next_ms):
                self.queue.push(entry.next_ms, shard, entry.id)
            return
        self.metrics.outbox_attempts.labels(entry.kind, "ok" if outcome.ok else "failed").inc()
        self._finish(shard, epoch, entry, outcome)

    def _finish(
        self, shard: int, epoch: str, entry: OutboxEntry, outcome: ExecutionOutcome | None
    ) -> None:
        entry.result = outcome_result(entry, outcome)
        if entry.on_result:
            entry.status = "callback"
            if self._store(shard, epoch, entry, self.clock.now_ms()):
                self._callback(shard, epoch, entry)
        elif outcome is not None and outcome.ok:
            self._store(shard, epoch, entry, None, delete=True)
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
            self._store(shard, epoch, entry, None)

    def _callback(self, shard: int, epoch: str, entry: OutboxEntry) -> None:
        assert entry.on_result is not None and entry.result is not None
        try:
            self.deliver(
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
        self._store(shard, epoch, entry, None, delete=True)

    def _store(
        self, shard: int, epoch: str, entry: OutboxEntry, due_ms: int | None, delete: bool = False
    ) -> bool:
        sk = self.keys.shard(shard)
        res = self._write(
            keys=[sk.lease, sk.outbox, sk.outbox_queue],
            args=[
                self.node_id,
                epoch,
                entry.id,
                b"" if delete else codec.pack(entry.to_dict()),
                "" if due_ms is None else str(due_ms),
            ],
        )
        if res == -1:
            log.info(
                "outbox %s: shard %d was taken over; leaving the entry to its owner",
                entry.id,
                shard,
            )
        return bool(res == 1)
