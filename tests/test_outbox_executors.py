"""Outbox executors of extensions: a plain ``def`` executor runs off the event loop
(one that blocks never stalls other actors), its outcome reaches the actor once, and
a replaceable entry is performed in its newest version only."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import pytest

from conftest import wait_until
from troth.core.access import OPERATOR
from troth.core.actor import CA
from troth.core.names import ActorName, shard_of
from troth.core.plugin import (
    ActorPlugin,
    ExecutionOutcome,
    OutboxPlugin,
    PluginFactory,
)
from troth.core.records import OutboxEntry
from troth.extension import Extension
from troth.node import Node

EXT = "test_outbox_executors:Slow"
RELEASE = threading.Event()
#: Attempts of GatedExecutor running now, and the most that ever ran at once.
RUNNING = [0, 0]


class SlowEffect(OutboxPlugin):
    kind: ClassVar[str] = "slow"

    def request(self, label: str, idempotent: bool = True) -> str:
        spec = {"label": label, **({} if idempotent else {"idempotent": False})}
        return self._enqueue(spec, idempotency_key=None, retry=None, on_result="done")


class SlowExecutor:
    """Blocks its thread until the test releases it, as a slow sync library would."""

    kind = "slow"
    idempotent = True

    def execute(self, entry: OutboxEntry) -> ExecutionOutcome:
        RELEASE.wait(10)
        return ExecutionOutcome(ok=True, value=entry.spec["label"].upper())


class SlowFactory(PluginFactory):
    name: ClassVar[str] = "slow"
    effect: ClassVar[type[SlowEffect]] = SlowEffect
    executor: ClassVar[type[Any]] = SlowExecutor

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return self.effect(actor, pstate)

    def executors(self) -> list[Any]:
        return [self.executor()]


class GatedEffect(SlowEffect):
    kind: ClassVar[str] = "gated"


class GatedExecutor:
    """Waits on the loop until the test releases it (as a slow webhook would)."""

    kind = "gated"
    idempotent = True

    async def execute(self, entry: OutboxEntry) -> ExecutionOutcome:
        RUNNING[0] += 1
        RUNNING[1] = max(RUNNING)
        try:
            while not RELEASE.is_set():
                await asyncio.sleep(0.01)
        finally:
            RUNNING[0] -= 1
        return ExecutionOutcome(ok=True, value=entry.spec["label"].upper())


class GatedFactory(SlowFactory):
    name: ClassVar[str] = "gated"
    effect = GatedEffect
    executor = GatedExecutor


class Worker(CA):
    def init(self) -> None:
        self.state["results"] = []

    async def start(self, label: str, idempotent: bool = True) -> str:
        return str(self.plugins.slow.request(label, idempotent))

    async def start_gated(self, label: str) -> str:
        return str(self.plugins.gated.request(label))

    async def done(self, result: dict[str, Any]) -> None:
        self.state["results"].append([result["ok"], result["value"], result["attempts"]])

    async def results(self) -> list[Any]:
        return list(self.state["results"])


class Slow(Extension):
    name: ClassVar[str] = "slow"

    def actor_types(self) -> Mapping[str, type[CA]]:
        return {"worker": Worker}

    def plugins(self) -> Mapping[str, type[PluginFactory]]:
        return {"slow": SlowFactory, "gated": GatedFactory}


def test_a_blocking_sync_executor_runs_off_the_loop_and_reports_once(
    make_node: Callable[..., Node],
) -> None:
    RELEASE.clear()
    node = make_node("n1", extensions=["troth.caas:CaaS", EXT], plugins={"slow": {}})
    worker = ActorName("worker", "alice-w")
    node.call(worker, "start", ["a"]).result(5)
    wait_until(lambda: node.dispatcher.in_flight == 1)
    # The executor blocks a thread of its own: other actors keep answering at once.
    started = time.perf_counter()
    assert node.call(ActorName("worker", "alice-other"), "results").result(5) == []
    assert time.perf_counter() - started < 0.5
    RELEASE.set()
    assert wait_until(lambda: node.call(worker, "results").result(5)) == [[True, "A", 1]]
    wait_until(lambda: node.dispatcher.in_flight == 0 and len(node.dispatcher) == 0)
    assert node.call(worker, "results").result(5) == [[True, "A", 1]]
    outbox = node.client.hlen(node.keys.shard(node.engine.cells["worker/alice-w"].shard).outbox)
    assert outbox == 0  # the result's commit deleted the entry


def test_no_more_attempts_run_at_once_than_outbox_workers_and_the_rest_follow_in_turn(
    make_node: Callable[..., Node],
) -> None:
    """``runtime.outbox_workers`` bounds the attempts in flight; the entries beyond it
    wait their turn (none is dropped, none runs twice) and start as attempts end."""
    RELEASE.clear()
    RUNNING[:] = [0, 0]
    node = make_node(
        "n1",
        extensions=["troth.caas:CaaS", EXT],
        plugins={"gated": {}},
        runtime={"outbox_workers": 3},
    )
    workers = [ActorName("worker", f"alice-w{i}") for i in range(8)]
    for worker in workers:
        node.call(worker, "start_gated", [worker.id]).result(5)
    wait_until(lambda: RUNNING[0] == 3)
    time.sleep(0.3)  # time enough for a fourth to start, were the bound not kept
    assert RUNNING == [3, 3] and node.dispatcher.in_flight == 8  # five wait their turn
    RELEASE.set()

    def reported() -> list[Any]:
        return [node.call(worker, "results").result(5) for worker in workers]

    wait_until(lambda: all(reported()))
    assert reported() == [[[True, worker.id.upper(), 1]] for worker in workers]
    assert RUNNING == [0, 3]


def test_an_idempotent_effect_due_at_once_has_its_intent_record_in_its_commit(
    make_node: Callable[..., Node],
) -> None:
    """The ledger says "attempting, attempt 1" while the attempt runs, as always; for
    an effect that may be repeated under its key that record is written by the commit
    that makes the effect, not by a write of its own. One that may not be repeated
    still gets its own intent record just before the attempt."""
    node = make_node("n1", extensions=["troth.caas:CaaS", EXT], plugins={"slow": {}})
    ledger_sha = node.dispatcher._script.sha
    prefix = node.keys.shard(0).lease.split("{")[0]

    def ledger_writes() -> int:
        return sum(
            1
            for e in node.client.slowlog_get(10_000)
            if e["command"].startswith(f"EVALSHA {ledger_sha}".encode())
            and prefix.encode() in e["command"]
        )

    slowlog = node.client.config_get("slowlog-*")
    node.client.config_set("slowlog-log-slower-than", 0)
    node.client.config_set("slowlog-max-len", 10_000)
    try:
        for label, idempotent in (("a", True), ("b", False)):
            RELEASE.clear()
            node.client.slowlog_reset()
            worker = ActorName("worker", f"alice-{label}")
            entry_id = node.call(worker, "start", [label, idempotent]).result(5)
            outbox = node.keys.shard(shard_of(worker, node.keys.shard_count)).outbox

            def ledgered() -> tuple[str, int]:
                entry = OutboxEntry.load(entry_id, node.client.hget(outbox, entry_id))  # noqa: B023
                return entry.status, entry.attempts

            assert wait_until(lambda: ledgered() == ("attempting", 1))
            RELEASE.set()
            done = [[True, label.upper(), 1]]
            assert wait_until(lambda: node.call(worker, "results").result(5)) == done  # noqa: B023
            # b's intent record, then its outcome's (it is handed back as a call)
            assert (ledger_writes() == 0) is idempotent, label
            assert node.client.hlen(outbox) == 0  # the result's commit deleted the entry
    finally:
        node.client.config_set("slowlog-log-slower-than", slowlog["slowlog-log-slower-than"])
        node.client.config_set("slowlog-max-len", slowlog["slowlog-max-len"])


# -- replaceable entries --------------------------------------------------------------

GATE = threading.Event()
SEEN: list[str] = []


class LatestNote(OutboxPlugin):
    kind: ClassVar[str] = "note"

    def note(self, value: str, delay: float) -> str:
        return self._enqueue(
            {"value": value},
            idempotency_key=None,
            retry=None,
            on_result=None,
            replace_id=f"{self.actor}:note",
            delay_seconds=delay,
        )


class NoteExecutor:
    kind = "note"
    idempotent = True
    records_attempts = False

    async def execute(self, entry: OutboxEntry) -> ExecutionOutcome:
        SEEN.append(entry.spec["value"])
        await asyncio.to_thread(GATE.wait, 10)
        return ExecutionOutcome(ok=True)


class NoteFactory(PluginFactory):
    name: ClassVar[str] = "note"

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return LatestNote(actor, pstate)

    def executors(self) -> list[Any]:
        return [NoteExecutor()]


class Noter(CA):
    async def note(self, value: str, delay: float) -> None:
        self.plugins.note.note(value, delay)


class Notes(Extension):
    name: ClassVar[str] = "notes"

    def actor_types(self) -> Mapping[str, type[CA]]:
        return {"noter": Noter}

    def plugins(self) -> Mapping[str, type[PluginFactory]]:
        return {"note": NoteFactory}


def test_a_replaceable_entry_is_performed_in_its_newest_version_only(
    make_node: Callable[..., Node],
) -> None:
    GATE.set()
    SEEN.clear()
    node = make_node("n1", extensions=["troth.caas:CaaS", "test_outbox_executors:Notes"])
    noter = ActorName("noter", "alice-n")
    outbox = node.keys.shard(shard_of(noter, node.keys.shard_count)).outbox

    def settled() -> bool:
        return node.dispatcher.in_flight == 0 and node.client.hlen(outbox) == 0

    # Replaced before it fell due: only the newest is performed.
    node.call(noter, "note", ["a", 0.5]).result(5)
    node.call(noter, "note", ["b", 0.5]).result(5)
    wait_until(settled)
    assert SEEN == ["b"]
    # Replaced while being performed: that attempt ends without touching the newer
    # version, which is performed next.
    GATE.clear()
    node.call(noter, "note", ["c", 0]).result(5)
    wait_until(lambda: SEEN == ["b", "c"])
    node.call(noter, "note", ["d", 0]).result(5)
    GATE.set()
    wait_until(settled)
    assert SEEN == ["b", "c", "d"]


def test_a_call_said_fresh_to_an_actor_that_exists_still_sees_its_state(
    make_node: Callable[..., Node],
) -> None:
    """``fresh`` skips the checkpoint read on activation; were the actor there after
    all, its commit is refused (seq) and the call retried with a read: nothing of the
    stored state is lost."""
    extensions = ["troth.caas:CaaS", EXT]
    first = make_node("n1", extensions=extensions, plugins={"slow": {}})
    worker = ActorName("worker", "alice-fresh")
    for n in range(2):
        first.call(worker, "done", [{"ok": True, "value": n, "attempts": 1}]).result(5)
    first.stop()
    second = make_node("n2", extensions=extensions, plugins={"slow": {}})
    result = {"ok": True, "value": 2, "attempts": 1}
    call = second.router.call(worker, "done", [result], {}, None, OPERATOR, fresh=True)
    asyncio.run_coroutine_threadsafe(call, second.loop).result(10)
    assert [v for _, v, _ in second.call(worker, "results").result(5)] == [0, 1, 2]


# -- executors that take many entries at once ------------------------------------------

BATCHES: list[list[str]] = []
ALONE: list[str] = []


class Tally(OutboxPlugin):
    kind: ClassVar[str] = "tally"

    def add(self, value: str) -> str:
        return self._enqueue(
            {"value": value}, idempotency_key=None, retry=None, on_result=None, delay_seconds=0.5
        )


class TallyExecutor:
    """Takes the entries due together in one call; refuses "bad" there, which then
    succeeds on its own."""

    kind = "tally"
    idempotent = True
    records_attempts = False

    async def execute(self, entry: OutboxEntry) -> ExecutionOutcome:
        ALONE.append(entry.spec["value"])
        return ExecutionOutcome(ok=True)

    async def execute_many(self, entries: list[OutboxEntry]) -> list[ExecutionOutcome]:
        BATCHES.append([e.spec["value"] for e in entries])
        return [ExecutionOutcome(ok=e.spec["value"] != "bad") for e in entries]


class TallyFactory(PluginFactory):
    name: ClassVar[str] = "tally"

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Tally(actor, pstate)

    def executors(self) -> list[Any]:
        return [TallyExecutor()]


class Tallier(CA):
    async def add(self, value: str) -> None:
        self.plugins.tally.add(value)


class Tallies(Extension):
    name: ClassVar[str] = "tallies"

    def actor_types(self) -> Mapping[str, type[CA]]:
        return {"tallier": Tallier}

    def plugins(self) -> Mapping[str, type[PluginFactory]]:
        return {"tally": TallyFactory}


def test_entries_due_together_take_one_call_and_a_refused_one_goes_alone(
    make_node: Callable[..., Node],
) -> None:
    BATCHES.clear()
    ALONE.clear()
    node = make_node("n1", extensions=["troth.caas:CaaS", "test_outbox_executors:Tallies"])
    values = [f"v{i}" for i in range(30)] + ["bad"]
    names = [ActorName("tallier", f"alice-{v}") for v in values]
    calls = [node.call(name, "add", [v]) for name, v in zip(names, values, strict=True)]
    for call in calls:
        call.result(5)
    outboxes = {node.keys.shard(shard_of(n, node.keys.shard_count)).outbox for n in names}
    wait_until(lambda: all(node.client.hlen(o) == 0 for o in outboxes) and ALONE)
    assert sorted(v for batch in BATCHES for v in batch) == sorted(values)
    assert len(BATCHES) <= 10  # due within a few ms of each other: they travel together
    assert ALONE == ["bad"]  # refused in the group, done on its own


def test_only_idempotent_executors_without_attempt_records_take_many(
    make_node: Callable[..., Node],
) -> None:
    class Counting(TallyExecutor):
        records_attempts = True

    dispatcher = make_node("n1").dispatcher
    with pytest.raises(ValueError, match="execute_many"):
        dispatcher.register(Counting())
    assert "tally" not in dispatcher._group_kinds
    dispatcher.register(TallyExecutor())
    assert "tally" in dispatcher._group_kinds
