"""Pure logic: names and shards, configuration, codec, hot HTTP routes."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO
from troth.core import codec, jsonsafe
from troth.core.aio import Slots
from troth.core.clock import Clock, ManualClock, SystemClock
from troth.core.config import ConfigError, load_config, parse_config
from troth.core.errors import (
    AppError,
    BadRequestError,
    NotFoundError,
    SerializationError,
    TrothError,
)
from troth.core.metrics import NodeMetrics
from troth.core.names import ActorName, shard_of
from troth.core.records import CommitOps, OutboxEntry, TimerRecord, timer_key
from troth.core.retry import RetryPolicy
from troth.edge.http_api import HotPath, NodeApp, hot
from troth.edge.server import _OneWrite
from troth.engine.duequeue import DueQueue, Stored


def test_names_and_owner() -> None:
    n = ActorName.parse("counter/alice-c1")
    assert (n.type, n.id, n.owner, str(n)) == ("counter", "alice-c1", "alice", "counter/alice-c1")
    assert ActorName.parse("counter/solo").owner is None
    for bad in ("counter", "Counter/x", "counter/", "counter/-x", "c/" + "x" * 201, "c/a b"):
        with pytest.raises(BadRequestError):
            ActorName.parse(bad)


def test_shard_hash_is_stable() -> None:
    # Fixed values recorded once: a change of the hash would strand every existing
    # checkpoint on a shard no node looks at.
    names = ["counter/alice-c1", "counter/a-0", "counter/a-1", "counter/a-2"]
    assert [shard_of(n, 1024) for n in names] == [217, 889, 1007, 597]
    assert shard_of("commitment/local-cm_0", 1024) == 232
    assert shard_of("counter/alice-c1", 64) == 25
    assert shard_of(ActorName.parse("counter/alice-c1"), 1024) == 217


def test_example_config_is_valid_and_complete() -> None:
    config = load_config(REPO / "ca.json.example")
    assert config.types["counter"].class_path == "examples.helloworld.counter:Counter"
    assert config.node.host == "127.0.0.1" and not config.auth.api_keys
    assert config.plugins["http"]["allow_loopback"] is True
    raw = json.loads((REPO / "ca.json.example").read_text())
    # every documented section is present in the example
    assert {"node", "redis", "cluster", "runtime", "auth", "types", "plugins"} <= set(raw)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.shards"):
        parse_config({"cluster": {"shards": 0}})
    with pytest.raises(ConfigError, match="heartbeat_seconds"):
        parse_config({"cluster": {"lease_ttl_seconds": 1, "heartbeat_seconds": 1}})
    with pytest.raises(ConfigError, match="nodes: Extra inputs"):
        parse_config({"nodes": {}})
    assert parse_config({"//": "comment", "node": {"//port": "x"}}).node.port == 8700


def test_codec_roundtrip_and_refusal() -> None:
    _, copy = codec.roundtrip({"a": (1, 2), "b": b"x", "c": None})
    assert copy == {"a": [1, 2], "b": b"x", "c": None}
    with pytest.raises(SerializationError):
        codec.pack({"s": {1, 2}})
    # The packer is reused (one a thread): a refusal half way leaves nothing behind.
    with pytest.raises(SerializationError):
        codec.pack(["kept?", {1, 2}])
    assert codec.pack({"a": 1}) == b"\x81\xa1a\x01"
    values = [{"n": i, "xs": list(range(i % 50))} for i in range(2000)]
    packed: dict[int, list[bytes]] = {}

    def pack_all(k: int) -> None:
        packed[k] = [codec.pack(v) for v in values]

    threads = [threading.Thread(target=pack_all, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all([codec.unpack(b) for b in packed[k]] == values for k in range(4))


def test_the_package_has_no_import_cycles() -> None:
    """Layers are checked by lint-imports; this checks every module pair, including
    imports made only for type checking."""
    import grimp

    graph = grimp.build_graph("troth", exclude_type_checking_imports=False)
    cycles = {
        tuple(sorted((a, b)))
        for a in graph.modules
        for b in graph.find_modules_directly_imported_by(a)
        if a != b and graph.find_shortest_chain(importer=b, imported=a)
    }
    assert cycles == set()


def test_hot_path_skips_the_middlewares_and_fastapi_and_keeps_their_answers() -> None:
    """Endpoints marked hot, on the app or in an included router, are served before
    the app's middlewares and FastAPI's routing (no FastAPI scope keys), with the
    same answers: the loopback rule, the body limit, the request metrics and the
    app's error handlers; other methods on the same path still reach FastAPI."""
    metrics = NodeMetrics()
    app = NodeApp()
    api = APIRouter(prefix="/v1")

    @app.exception_handler(TrothError)
    async def _troth(_request: Request, exc: TrothError) -> JSONResponse:
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status)

    def seen(request: Request) -> JSONResponse:
        return JSONResponse({"fastapi": "fastapi_middleware_astack" in request.scope})

    @api.post("/things")
    @hot
    async def make(request: Request) -> JSONResponse:
        if (await request.body()) == b"missing":
            raise NotFoundError("no such thing")
        return seen(request)

    @api.get("/things")
    async def list_things(request: Request) -> JSONResponse:
        return seen(request)

    @app.post("/v1/calls/{name}")
    @hot
    async def call(request: Request) -> JSONResponse:
        return JSONResponse(
            {"name": request.path_params["name"], "body": len(await request.body())}
        )

    app.include_router(api)
    app.hot_path = functools.partial(
        HotPath,
        source=app,
        routers=[app.router, api],
        metrics=metrics,
        access_log=False,
        local_only=True,
        max_body_bytes=10,
    )

    async def check() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            assert (await http.post("/v1/things")).json() == {"fastapi": False}
            assert (await http.get("/v1/things")).json() == {"fastapi": True}
            json_type = {"content-type": "application/json"}
            made = await http.post("/v1/calls/x", content=b"[1,2,3]", headers=json_type)
            assert made.json() == {"name": "x", "body": 7}
            missing = await http.post("/v1/things", content=b"missing", headers=json_type)
            assert missing.status_code == 404
            assert missing.json()["error"]["type"] == "NotFoundError"
            big = b"[" + b"1," * 10 + b"1]"
            declared = await http.post("/v1/calls/x", content=big, headers=json_type)
            assert declared.status_code == 413

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted
                for i in range(0, len(big), 4):
                    yield big[i : i + 4]

            streamed = await http.post("/v1/calls/x", content=chunks(), headers=json_type)
            assert streamed.status_code == 413
            for headers, status in (({"host": "evil.example"}, 403), ({}, 415)):
                refused = await http.post("/v1/calls/x", content=b"{}", headers=headers)
                assert refused.status_code == status
                assert refused.json()["error"]["message"]

    asyncio.run(check())
    counted = {
        (s.labels["route"], s.labels["status"]): s.value
        for m in metrics.registry.collect()
        if m.name == "troth_http_requests"
        for s in m.samples
        if s.name == "troth_http_requests_total"
    }
    assert counted == {
        ("/v1/things", "200"): 1.0,  # the hot POST; the GET went through FastAPI, unmetered
        ("/v1/calls/{name}", "200"): 1.0,
        ("/v1/things", "404"): 1.0,
        ("/v1/calls/{name}", "413"): 2.0,
        ("/v1/calls/{name}", "403"): 1.0,
        ("/v1/calls/{name}", "415"): 1.0,
    }


def test_slots_serve_waiters_in_turn_and_lose_none_to_cancellation() -> None:
    """The outbox's and the HTTP client's bound on work at once: never more than its
    count, waiters served first come first served, and a waiter cancelled before or
    after it was handed a slot neither holds it nor loses it."""

    async def check() -> None:
        slots = Slots(2)
        running: list[int] = []
        most = 0
        order: list[int] = []

        async def work(i: int) -> None:
            nonlocal most
            if not slots.take_now():
                await slots.take()
            try:
                running.append(i)
                most = max(most, len(running))
                order.append(i)
                await asyncio.sleep(0.01)
            finally:
                running.remove(i)
                slots.give()

        await asyncio.gather(*(work(i) for i in range(8)))
        assert most == 2 and order == list(range(8)) and slots.free == 2

        assert slots.take_now() and slots.take_now() and not slots.take_now()
        waiting = asyncio.ensure_future(slots.take())
        await asyncio.sleep(0)
        waiting.cancel()  # cancelled while waiting: it takes nothing
        handed = asyncio.ensure_future(slots.take())
        await asyncio.sleep(0)
        slots.give()  # handed to `handed` (the cancelled one is skipped) ...
        handed.cancel()  # ... which is cancelled before it runs: the slot goes on
        with pytest.raises(asyncio.CancelledError):
            await handed
        assert waiting.cancelled() and slots.free == 1
        slots.give()
        assert slots.free == 2

    asyncio.run(check())


class _Recorder:
    """A transport that keeps what is written to it, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_a_response_head_waits_for_its_body_but_never_past_the_loop_turn() -> None:
    async def check() -> None:
        sent = _Recorder()
        out = _OneWrite(sent)  # type: ignore[arg-type]
        out.write(b"HTTP/1.1 200 OK\r\n\r\n")
        out.write(b"{}")
        assert sent.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
        out.write(b"HTTP/1.1 200 OK\r\n\r\n")  # a streamed response: the body comes later
        assert len(sent.writes) == 1
        await asyncio.sleep(0)
        assert sent.writes[1] == b"HTTP/1.1 200 OK\r\n\r\n"
        out.write(b"chunk")
        out.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
        out.close()  # what is held goes first
        assert sent.writes[2:] == [b"chunk", b"HTTP/1.1 500 Internal Server Error\r\n\r\n"]
        assert sent.closed
        await asyncio.sleep(0)
        assert len(sent.writes) == 4  # written once

    asyncio.run(check())


def test_loop_metrics_expose_what_prometheus_clients_own_would() -> None:
    """The loop's counters and histograms are scraped as the library's are: same
    series, same bucket bounds (``le``: at most), same counts and sums."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from troth.core.metrics import LoopCounter, LoopHistogram

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1, 10)
    mine_h = LoopHistogram("lat_seconds", "latency", buckets, ["route"], registry=ours)
    lib_h = Histogram("lat_seconds", "latency", ["route"], buckets=buckets, registry=theirs)
    mine_c = LoopCounter("hits", "hits", ["outcome"], registry=ours)
    lib_c = Counter("hits", "hits", ["outcome"], registry=theirs)
    plain, lib_plain = LoopCounter("n", "n", registry=ours), Counter("n", "n", registry=theirs)
    for value in (0, 0.001, 0.0011, 0.01, 0.5, 1, 9.99, 10, 11, 1e9):
        for route in ("/a", "/b") if value < 1 else ("/a",):
            mine_h.labels(route).observe(value)
            lib_h.labels(route).observe(value)
        mine_c.labels("ok").inc(2)
        lib_c.labels("ok").inc(2)
        plain.inc()
        lib_plain.inc()

    def series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for m in registry.collect()
            for s in m.samples
            if not s.name.endswith("_created")
        }

    assert series(ours) == series(theirs)
    assert ours.get_sample_value("lat_seconds_bucket", {"route": "/a", "le": "0.001"}) == 2
    assert ours.get_sample_value("lat_seconds_count", {"route": "/b"}) == 5
    with pytest.raises(ValueError):
        mine_c.labels("ok", "extra")


def test_cluster_routing_finds_each_commands_slot() -> None:
    """The batcher routes by the slot of a script's first key, a stream read's first
    stream, or a command's key; a hash tag decides (as Redis Cluster does)."""
    from redis.crc import key_slot

    from troth.core.batcher import _slot
    from troth.core.keys import KeySpace

    sk = KeySpace("p", 1024).shard(17)
    tag = key_slot(b"s17")
    assert _slot(("EVALSHA", "abc", 2, sk.lease, sk.checkpoint("counter/x"), "n1")) == tag
    assert _slot(("HGET", sk.checkpoint("counter/y"), "seq")) == tag
    assert _slot(("XREAD", "COUNT", 10, "STREAMS", sk.notifications("a"), "0-0")) == tag
    assert _slot(("SADD", "p:principals", "alice")) == key_slot(b"p:principals")
    assert _slot(("GET", b"p:{cm:alice}:count")) == key_slot(b"cm:alice")


def test_cluster_urls_are_recognised_without_a_server() -> None:
    from troth.core.redis_clients import cluster_url

    assert cluster_url("redis+cluster://127.0.0.1:7000") == "redis://127.0.0.1:7000"
    assert cluster_url("rediss+cluster://h:7000/0") == "rediss://h:7000/0"
    assert cluster_url("unix:///tmp/redis.sock") is None  # never asks a Unix socket


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_strict_json_fast_path_agrees_with_the_exact_parser(value: object) -> None:
    """orjson parses the bodies; the standard library with exact checks is the
    reference: both accept the same documents and read the same values."""
    raw = json.dumps(value).encode()
    exact: object
    try:
        exact = jsonsafe._exact(raw, "body")
    except BadRequestError:
        exact = BadRequestError
    try:
        fast: object = jsonsafe.loads(raw)
    except BadRequestError:
        fast = BadRequestError
    assert fast == exact


def test_strict_json_refusals() -> None:
    deep = b"[" * 65 + b"]" * 65
    deep_objects = b'[{"a": ' * 33 + b"1" + b"}]" * 33  # 66 deep, arrays and objects
    for raw in (
        b"[NaN]",
        b"[1e400]",
        b'"\\ud800"',
        b"[-9223372036854775809]",
        deep,
        deep_objects,
        b"{",
    ):
        with pytest.raises(BadRequestError):
            jsonsafe.loads(raw)
    assert jsonsafe.loads(b"[18446744073709551615, -9223372036854775808]") == [2**64 - 1, -(2**63)]
    assert jsonsafe.loads(b"[" * 64 + b"]" * 64) is not None  # as deep as kept
    wide = b"[" + b"[[]]," * 100 + b'"[[[["]'  # many brackets, shallow
    assert len(jsonsafe.loads(wide)) == 101


@pytest.mark.parametrize("clock", [SystemClock(), ManualClock()], ids=["system", "manual"])
def test_due_queue_hands_nearby_items_over_together_and_never_early(clock: Clock) -> None:
    """Items due within the coalescing pause travel in one hand-over, none leaves the
    queue before its due time, and a test clock that stands still holds nothing back."""
    handed: list[tuple[int, list[str]]] = []
    arrived = threading.Event()

    def on_due(items: list[tuple[int, str, object]]) -> None:
        handed.append((clock.now_ms(), [key for _, key, _ in items]))
        arrived.set()

    queue = DueQueue("test", on_due, clock, coalesce_ms=300)
    queue.start()
    try:
        now = clock.now_ms()
        due = {f"k{i}": now + 200 + i * 50 for i in range(5)}  # over 200 ms
        for key, at in due.items():
            queue.push(at, 0, key)
        queue.push(now + 60_000, 0, "later")
        if isinstance(clock, ManualClock):
            assert not arrived.wait(0.5)  # not due: nothing, however long one waits
            clock.advance(0.5)  # all five are due; the clock then stands still
        assert arrived.wait(5)
        time.sleep(0.5)
        assert [keys for _, keys in handed] == [list(due)]
        assert all(handed[0][0] >= at for at in due.values())
    finally:
        queue.stop()


class _Stored:
    """A due queue's store in memory: key -> (due, shard, token); ``during_read`` runs
    in the middle of a read (as a commit racing it would), ``fail`` refuses reads."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[int, int, object]] = {}
        self.during_read: list[object] = []
        self.fail = 0

    def read(self, shards: list[int], after_ms: int | None, until_ms: int) -> Stored:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("store down")
        found = [
            (due, shard, key, token)
            for key, (due, shard, token) in self.items.items()
            if shard in shards and (after_ms is None or due > after_ms) and due <= until_ms
        ]
        while self.during_read:
            self.during_read.pop()()  # type: ignore[operator]
        return found

    def earliest(self, shards: list[int], after_ms: int) -> int | None:
        dues = [d for d, s, _ in self.items.values() if s in shards and d > after_ms]
        return min(dues, default=None)


def test_due_queue_holds_only_its_window_and_reads_the_rest_as_time_comes() -> None:
    """With a store, a queue holds the items due within its window: a claim reads only
    those, a push due later is left to the store (and takes the key's older item out),
    and as time moves on the window's next stretch is read, each item handed over once
    at its due time. A push racing a read wins over the read's older copy, and a failed
    read is read again."""
    clock = ManualClock(0)
    handed: list[tuple[int, str, object]] = []
    lock = threading.Lock()

    def on_due(items: list[tuple[int, str, object]]) -> None:
        with lock:
            handed.extend((clock.now_ms(), key, token) for _, key, token in items)

    def keys() -> list[str]:
        with lock:
            return [key for _, key, _ in handed]

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    store = _Stored()
    day = 86_400_000
    store.items = {"soon": (60_000, 0, "s"), "tomorrow": (day, 0, "t"), "other": (1, 9, "o")}
    queue = DueQueue("test", on_due, clock, store=store, horizon_ms=120_000)
    queue.claim([0])
    assert len(queue) == 1  # "soon"; "tomorrow" waits in the store, shard 9 is not ours
    queue.push(2 * day, 0, "soon", "moved")  # re-set beyond the window: not held
    assert len(queue) == 0
    store.items["soon"] = (2 * day, 0, "moved")
    queue.push(30_000, 0, "near", "n")
    assert queue.next_due() == 30_000
    queue.discard("near")
    assert queue.next_due() == day  # the earliest stored item beyond the window
    queue.start()
    try:
        # The day's window read races a commit that re-sets "tomorrow": the push wins.
        store.during_read = [lambda: queue.push(day + 5, 0, "tomorrow", "newer")]
        store.fail = 1  # and the first read fails: it is read again
        clock.advance(day / 1000)
        until(lambda: not queue.reading_due and len(queue) == 1)
        assert keys() == []  # due 5 ms later
        clock.advance(1)
        until(lambda: keys() == ["tomorrow"])
        assert handed[0][1:] == ("tomorrow", "newer") and handed[0][0] >= day + 5
        clock.advance(day / 1000)
        until(lambda: "soon" in keys())
        time.sleep(0.3)
        assert keys() == ["tomorrow", "soon"]  # each once
    finally:
        queue.stop()


def _timer(name: str, due_ms: int = 1) -> TimerRecord:
    return TimerRecord("a/b", name, "0" * 32, "m", [], {}, due_ms)


def test_ops_of_later_calls_undo_earlier_ones_in_one_commit() -> None:
    """Group commit appends each call's ops; the commit script applies timer cancels
    before sets and member removals before additions, so a later op must replace an
    earlier one of the other kind: the result is what the calls in order would leave."""
    ops = CommitOps(timers_set=[_timer("a"), _timer("b")], members_add=["m1"])
    ops.extend(CommitOps(timers_cancel=[timer_key("a/b", "a")], members_remove=["m1", "m2"]))
    ops.extend(CommitOps(timers_set=[_timer("b", 2)], members_add=["m2"], notifications=[b"n"]))
    assert [(t.name, t.due_ms) for t in ops.timers_set] == [("b", 2)]
    assert ops.timers_cancel == [timer_key("a/b", "a")]
    assert (ops.members_add, ops.members_remove) == (["m2"], ["m1"])
    assert ops.notifications == [b"n"]


def test_withdrawing_an_entry_of_the_same_commit_drops_it() -> None:
    """The commit script checks withdrawals before it writes new entries: an entry that
    a later call of the group withdraws must not be written at all."""
    armed = OutboxEntry("e1", "webhook", "a/b", {}, "e1", {})
    kept = OutboxEntry("e2", "webhook", "a/b", {}, "e2", {})
    ops = CommitOps(outbox=[armed, kept])
    refusal = AppError("began")
    ops.extend(CommitOps(outbox_withdraw={"e1": refusal, "e0": refusal}))
    assert [e.id for e in ops.outbox] == ["e2"]
    assert ops.outbox_withdraw == {"e1": refusal, "e0": refusal} and not ops.empty()


def test_an_outbox_entry_is_stored_without_its_defaults() -> None:
    """The ledger's hash field is the id; the idempotency key when it is the id and the
    default retry policy are left out too (a pending delivery's bytes are most of a
    commitment's), and every entry loads back equal, as do entries stored whole."""
    default_retry = RetryPolicy().model_dump()
    entry = OutboxEntry("e1", "webhook", "a/b", {"x": 1}, "e1", default_retry, on_result="done")
    stored = entry.to_dict()
    assert set(stored) == {"kind", "origin", "spec", "on_result", "created_ms", "next_ms"}
    assert OutboxEntry.load(b"e1", codec.pack(stored)) == entry
    custom = OutboxEntry("e2", "webhook", "a/b", {}, "cm_1", {"max_attempts": 2}, attempts=1)
    assert {"idempotency_key", "retry", "attempts"} <= set(custom.to_dict())
    assert OutboxEntry.load("e2", codec.pack(custom.to_dict())) == custom
    whole = {"id": "e2", **custom.to_dict()}
    assert OutboxEntry.load("e2", codec.pack(whole)) == custom
