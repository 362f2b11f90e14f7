"""``self.plugins.commitments``: the side effects of the built-in ``commitment`` actor.

Three outbox kinds, all performed after the commit that decided them:

* ``webhook``: a commitment's delivery, signed per attempt (Standard Webhooks, see
  :mod:`troth.caas.delivery`), retried per the commitment's retry policy: 2xx
  fulfils; timeouts, connection errors, 408, 429 and 5xx are retried; any other
  status fails at once. Targets on loopback or private networks are refused unless
  the settings allow them.
* ``cmindex``: the commitment's summary for listings (:mod:`troth.caas.index`), on
  Redis Cluster only: on a single Redis the commit itself updates the index (the
  commit step ``cmindex``);
* ``cmfanout``: an event, stored once, handed by its bus to every subscribed
  commitment (``on_event``). A fan-out cut short by a crash starts again; a
  commitment that has taken an event already ignores it (it remembers the ids).

Signing secrets: ``signing_secrets`` maps principals to ``whsec_...`` secrets (or
lists of them, newest first: each signs); a principal without one gets a random
secret, kept in Redis, which the API shows to that principal at
``GET /v1/commitments-secret`` and rotates (:mod:`troth.caas.signing`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from troth.caas import delivery
from troth.caas.index import COMMIT_STEP, MAX_INDEXED_KEYS, CommitmentIndex
from troth.caas.signing import MAX_CONFIGURED, SigningSecrets
from troth.core.access import SYSTEM, Caller
from troth.core.errors import AppError, CallTimeout, RetryableError, TrothError
from troth.core.metrics import LoopCounter, LoopHistogram
from troth.core.names import ActorName
from troth.core.plugin import (
    ActorPlugin,
    ExecutionOutcome,
    OutboxPlugin,
    PluginContext,
    PluginFactory,
)
from troth.core.records import CommitOps, CommitStep, OutboxEntry, TxnInfo
from troth.core.retry import RetryPolicy
from troth.plugins.members import scan_members
from troth.plugins.outbound import AddressPolicy, OutboundClient, outcome_of

log = logging.getLogger(__name__)

#: Retries of the service's own effects (fan-outs, index updates): they must happen.
INTERNAL_RETRY = RetryPolicy(max_attempts=100, initial_delay_seconds=1, max_delay_seconds=30)

#: On Redis Cluster, seconds between a commitment's transition and its index update.
#: Listings lag that much behind transitions nobody asked for (delivery, expiry); a
#: GET by id never lags, and the API updates the index at once after a create,
#: cancel or retry. (On a single Redis the index never lags.)
INDEX_DELAY = 1.0
#: The same for ``triggered``, which usually lasts only until the delivery: its
#: update waits longer, so that the outcome's replaces it. When 10,000 fire at once
#: and the last is delivered seconds later, each then costs one index update, not two.
TRIGGERED_INDEX_DELAY = 5.0


_INDEX_DELAYS = {"retired": 0.0, "triggered": TRIGGERED_INDEX_DELAY}


class CommitmentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allow_loopback: bool = Field(False, description="Allow deliveries to 127.0.0.0/8, ::1.")
    allow_private: bool = Field(False, description="Allow private and link-local targets.")
    timeout_seconds: float = Field(10.0, gt=0, le=120, description="Per delivery attempt.")
    signing_secrets: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description=(
            "Principal -> whsec_ secret, or a list of them, newest first (each signs: "
            "rotation); others get a random one."
        ),
    )
    retention_seconds: float = Field(
        86_400.0,
        ge=0,
        le=365 * 86_400,
        description="How long a finished commitment is kept before it is deleted.",
    )
    indexed_metadata: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=list,
        max_length=MAX_INDEXED_KEYS,
        description=(
            "Metadata keys whose values are indexed: a search by one is exact and "
            "pages; one by another key scans."
        ),
    )

    @field_validator("signing_secrets")
    @classmethod
    def _standard_secrets(cls, secrets: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for principal, given in secrets.items():
            listed = [given] if isinstance(given, str) else given
            # (the messages name the principal, never a secret)
            if not 1 <= len(listed) <= MAX_CONFIGURED or len(set(listed)) < len(listed):
                raise ValueError(
                    f"principal {principal!r}: list 1 to {MAX_CONFIGURED} distinct secrets"
                )
            for secret in listed:
                try:
                    delivery.secret_key(secret)
                except ValueError as exc:
                    raise ValueError(f"principal {principal!r}: {exc}") from None
        return secrets

    @field_validator("indexed_metadata")
    @classmethod
    def _searchable_keys(cls, keys: list[str]) -> list[str]:
        if len(set(keys)) < len(keys):
            raise ValueError("list each key once")
        for key in keys:
            if "=" in key:  # a search is KEY=VALUE, split at the first "="
                raise ValueError(f"metadata key {key!r}: no '=' in a searchable key")
        return keys

    def configured_secrets(self) -> dict[str, list[str]]:
        """Each configured principal's secrets, newest first."""
        return {p: [s] if isinstance(s, str) else s for p, s in self.signing_secrets.items()}


class Commitments(OutboxPlugin):
    kind: ClassVar[str] = "webhook"

    def __init__(
        self,
        actor: ActorName,
        pstate: dict[str, Any],
        retention_seconds: float,
        index: CommitmentIndex | None,
    ) -> None:
        super().__init__(actor, pstate)
        #: How long the commitment is kept once it has ended (the node's setting).
        self.retention_seconds = retention_seconds
        #: The index, when the commit updates it (a single Redis).
        self._inline = index
        self._step: CommitStep | None = None

    def deliver(
        self,
        *,
        commitment_id: str,
        principal: str,
        obligation: dict[str, Any],
        trigger: Any,
        due_ms: int | None,
        fired_ms: int | None,
        retry: dict[str, Any],
        on_result: str,
        delay_seconds: float = 0.0,
    ) -> str:
        """The delivery; with ``delay_seconds`` (and ``fired_ms`` None) it is *armed*:
        committed now, performed when due without another transaction of the
        commitment, fired at its first attempt (see :meth:`withdraw`). The commitment
        id travels as the entry's idempotency key; the spec leaves out what is empty
        (a pending delivery's bytes are most of what a commitment keeps in Redis)."""
        spec = {"principal": principal, "target": obligation["target"], "trigger": trigger}
        optional = {"payload": obligation.get("payload"), "due_ms": due_ms, "fired_ms": fired_ms}
        spec.update((k, v) for k, v in optional.items() if v is not None)
        if obligation.get("headers"):
            spec["headers"] = obligation["headers"]
        return self._enqueue(
            spec,
            idempotency_key=commitment_id,
            retry=retry,
            on_result=on_result,
            delay_seconds=delay_seconds,
            packable=True,  # the commitment's validated JSON, and what fired it
        )

    def withdraw(self, entry_id: str, refusal: AppError) -> None:
        """Take back an armed delivery that has not begun; if it has, the transaction
        is refused with ``refusal`` (see ``OutboxPlugin._withdraw``)."""
        self._withdraw(entry_id, refusal)

    def fanout(self, event: dict[str, Any]) -> str:
        """Hand ``event`` to every commitment subscribed to this bus (its members)."""
        return self._enqueue(
            {"event": event},
            idempotency_key=None,
            retry=INTERNAL_RETRY,
            on_result=None,
            kind="cmfanout",
        )

    def index(
        self,
        principal: str,
        summary: dict[str, Any],
        tombstone_ms: int = 0,
        *,
        bind: str | None = None,
        pending_quota: int | None = None,
    ) -> None:
        """Update the index with this summary; a ``retired`` one removes the commitment
        from it and leaves a tombstone for ``tombstone_ms``. On a single Redis, in this
        commit, where a creation also binds its ``dedup_key`` (``bind``) and checks
        the ``pending_quota`` (see :meth:`CommitmentIndex.step`); the newest summary
        of a transaction is the one applied. On Redis Cluster through the outbox: a
        ``retired`` one at once, any other ``INDEX_DELAY`` seconds after the commit
        (``TRIGGERED_INDEX_DELAY`` for a ``triggered`` one), a newer summary replacing
        one not sent yet."""
        if self._inline is not None:
            self._require_txn()
            self._step = self._inline.step(principal, summary, tombstone_ms, bind, pending_quota)
            return
        self._enqueue(
            {"principal": principal, "summary": summary, "tombstone_ms": tombstone_ms},
            idempotency_key=None,
            retry=INTERNAL_RETRY,
            on_result=None,
            kind="cmindex",
            replace_id=f"{self.actor}:cmindex",
            delay_seconds=_INDEX_DELAYS.get(summary["status"], INDEX_DELAY),
        )

    def begin(self, txn: TxnInfo) -> None:
        super().begin(txn)
        self._step = None

    def prepare(self, ops: CommitOps) -> None:
        super().prepare(ops)
        if self._step is not None:
            ops.steps.append(self._step)

    def committed(self) -> None:
        super().committed()
        self._step = None

    def abort(self) -> None:
        super().abort()
        self._step = None


class WebhookExecutor:
    kind = "webhook"
    idempotent = True  # every attempt carries the commitment id as Idempotency-Key

    def __init__(self, factory: CommitmentsFactory) -> None:
        self.factory = factory
        s = factory.settings
        policy = AddressPolicy(s.allow_loopback, s.allow_private)
        self.client = OutboundClient(policy, s.timeout_seconds, "troth-commitments")

    async def execute(self, entry: OutboxEntry) -> ExecutionOutcome:
        """One attempt. An armed delivery fires at its first attempt: that time is
        kept in the entry (the next attempts' ``fired_at``; the dispatcher stores the
        entry after an attempt) and returned as the outcome's ``fired_ms``, for the
        commitment to record."""
        spec, m = entry.spec, self.factory
        if spec.get("fired_ms") is None:
            spec["fired_ms"] = m.context.clock.now_ms()
        if entry.attempts == 1 and spec.get("due_ms") is not None:
            m.lateness.observe(max(0, spec["fired_ms"] - spec["due_ms"]) / 1000)
        secrets = await m.secrets.signing(spec["principal"], m.context.clock.now_ms())
        body, headers = delivery.build(entry.idempotency_key, spec, entry.attempts, secrets)
        started = time.perf_counter()
        resp = await self.client.attempt(
            "POST", spec["target"], content=body, headers=headers, repeatable=True
        )
        m.latency.observe(time.perf_counter() - started)
        fired = {"fired_ms": spec["fired_ms"]}
        if isinstance(resp, ExecutionOutcome):
            m.deliveries("error" if resp.retryable else "refused").inc()
            return resp.model_copy(update={"value": fired})
        outcome = outcome_of(resp.status_code, fired)
        label = "ok" if outcome.ok else "retryable" if outcome.retryable else "rejected"
        m.deliveries(label).inc()
        return outcome


class IndexExecutor:
    kind = "cmindex"
    idempotent = True  # applying a summary twice, or an older one, changes nothing
    records_attempts = False  # so an update costs the apply and the entry's deletion

    def __init__(self, index: CommitmentIndex) -> None:
        self.index = index

    async def execute(self, entry: OutboxEntry) -> ExecutionOutcome:
        await self.index.apply(
            entry.spec["principal"], entry.spec["summary"], entry.spec.get("tombstone_ms", 0)
        )
        return ExecutionOutcome(ok=True)

    async def execute_many(self, entries: list[OutboxEntry]) -> list[ExecutionOutcome]:
        """The updates of many commitments, one request per principal and tombstone."""
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for entry in entries:
            key = (entry.spec["principal"], entry.spec.get("tombstone_ms", 0))
            groups.setdefault(key, []).append(entry.spec["summary"])
        await asyncio.gather(
            *(self.index.apply_many(p, sums, tomb) for (p, tomb), sums in groups.items())
        )
        return [ExecutionOutcome(ok=True)] * len(entries)


class FanoutExecutor:
    """Pages through the bus's subscribers and calls ``on_event`` on each, at most
    ``CONCURRENCY`` at once; after each page, the bus forgets in one commit those that
    answered they no longer wait. A subscriber that cannot take the event now
    (moving, busy) makes the whole fan-out retried later; the others ignore the
    repeat."""

    kind = "cmfanout"
    idempotent = True
    PAGE = 500
    CONCURRENCY = 256

    def __init__(self, context: PluginContext, timeout: float) -> None:
        self.context = context
        self.timeout = timeout

    async def execute(self, entry: OutboxEntry) -> ExecutionOutcome:
        bus = ActorName.parse(entry.origin)
        event = entry.spec["event"]
        caller = Caller.of_actor(entry.origin)
        slots = asyncio.Semaphore(self.CONCURRENCY)
        delivered, retry = 0, []

        async def one(name: str) -> str | None:
            """``name`` if it no longer waits (or is gone)."""
            nonlocal delivered
            async with slots:
                try:
                    waiting = await self.context.deliver(
                        name, "on_event", [event], {}, None, self.timeout, caller
                    )
                    delivered += 1
                    return None if waiting else name
                except (RetryableError, CallTimeout) as exc:
                    retry.append(f"{name}: {exc}")
                except TrothError as exc:  # gone, or refused: nothing to repeat
                    log.info("event %s to %s: %s", event.get("event_id"), name, exc)
                    return name
                return None

        cursor = 0
        while True:
            cursor, page = await scan_members(self.context, bus, cursor, self.PAGE)
            done = [n for n in await asyncio.gather(*(one(name) for name in page)) if n]
            if done:
                await self.context.deliver(
                    entry.origin, "forget", [done], {}, None, self.timeout, SYSTEM
                )
            if cursor == 0:
                break
        if retry:
            return ExecutionOutcome(
                ok=False, retryable=True, error=f"{len(retry)} not reached: {retry[0]}"
            )
        return ExecutionOutcome(ok=True, value={"delivered": delivered})


class CommitmentsFactory(PluginFactory):
    name: ClassVar[str] = "commitments"
    settings_model = CommitmentSettings

    def __init__(self, context: PluginContext, settings: dict[str, Any]) -> None:
        super().__init__(context, settings)
        self.index = CommitmentIndex(
            context.client, context.keys, context.batcher, self.settings.indexed_metadata
        )
        #: The index when commits update it (a single Redis; None on Redis Cluster).
        self.inline_index = None if context.cluster else self.index
        r = context.metrics.registry
        #: ``deliveries(outcome)``: the series of ``troth_commitment_deliveries``.
        self.deliveries = LoopCounter(
            "troth_commitment_deliveries", "Delivery attempts by outcome.", ["outcome"], r
        ).labels
        self.latency = LoopHistogram(
            "troth_commitment_delivery_latency_seconds",
            "Duration of one delivery attempt.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.lateness = LoopHistogram(
            "troth_commitment_firing_lateness_seconds",
            "Delay from due time to first delivery attempt.",
            (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        #: The secrets that sign each principal's deliveries.
        self.secrets = SigningSecrets(
            self.settings.configured_secrets(),
            context.batcher,
            context.keys.prefix,
            context.clock,
        )
        self._webhook = WebhookExecutor(self)

    def start(self) -> None:
        self.index.reconcile_metadata()

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Commitments(actor, pstate, self.settings.retention_seconds, self.inline_index)

    def commit_steps(self) -> dict[str, str]:
        return {} if self.context.cluster else {"cmindex": COMMIT_STEP}

    def executors(self) -> list[Any]:
        fanout = FanoutExecutor(self.context, self.settings.timeout_seconds)
        return [self._webhook, IndexExecutor(self.index), fanout]

    def close(self) -> None:
        self.index.close()

    async def aclose(self) -> None:
        await self._webhook.client.aclose()
