"""Several nodes in one process: routing, handoff, the client library, notifications."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from conftest import wait_until
from troth import AppError
from troth.client import AsyncClient, CallTimeout, Client, Notification
from troth.core.access import OPERATOR
from troth.core.errors import BadRequestError
from troth.core.names import ActorName, shard_of
from troth.edge.server import ServerThread
from troth.node import Node


def owned_by(node: Node, prefix: str = "alice-c") -> str:
    """An actor id whose shard ``node`` owns."""
    for i in range(10_000):
        name = ActorName("counter", f"{prefix}{i}")
        if node.leases.epoch_of(shard_of(name, node.keys.shard_count)) is not None:
            return name.id
    raise AssertionError("node owns no shard")


def balanced(*nodes: Node) -> bool:
    return all(len(n.leases.owned) == 64 // len(nodes) for n in nodes)


def test_any_node_accepts_any_call(make_node: Callable[..., Node]) -> None:
    a = make_node("a", serve=True)
    b = make_node("b", serve=True)
    wait_until(lambda: balanced(a, b), timeout=10)
    wait_until(lambda: len(a.leases.urls) == 2 and len(b.leases.urls) == 2, timeout=5)
    on_b = owned_by(b)
    with httpx.Client(base_url=a.url) as api:
        url = f"/v1/actors/counter/{on_b}/increment"
        assert api.post(url, json={"args": [3], "request_id": "x"}).json() == {"result": 3}
        assert api.post(url, json={"args": [3], "request_id": "x"}).json() == {"result": 3}
        err = api.post(url, json={"args": [0]})
        assert err.status_code == 409 and err.json()["error"]["type"] == "AppError"
    assert f"counter/{on_b}" in b.engine.cells and f"counter/{on_b}" not in a.engine.cells


def test_calls_forwarded_together_travel_in_one_request_each_answered_alone(
    make_node: Callable[..., Node],
) -> None:
    """Forty calls made together that the entry node forwards in one loop turn reach
    the owner in one request; each keeps its own outcome (a refusal among them fails
    only its caller), and a request id still de-duplicates across batches."""
    a = make_node("a", serve=True)
    b = make_node("b", serve=True)
    wait_until(lambda: balanced(a, b), timeout=10)
    wait_until(lambda: len(a.leases.urls) == 2 and len(b.leases.urls) == 2, timeout=5)
    names = []
    for i in range(10_000):
        name = ActorName("counter", f"alice-f{i}")
        if b.leases.epoch_of(shard_of(name, b.keys.shard_count)) is not None:
            names.append(name)
        if len(names) == 40:
            break
    # the entry node's routing table (a heartbeat old) names the owner: no retries
    wait_until(
        lambda: all(a.leases.owner_of(shard_of(n, a.keys.shard_count)) == "b" for n in names),
        timeout=5,
    )

    def sent_to_b(route: str) -> float:
        return (
            b.metrics.registry.get_sample_value(
                "troth_http_requests_total", {"method": "POST", "route": route, "status": "200"}
            )
            or 0.0
        )

    async def forward_all() -> list[object]:
        calls = [
            a.router.call(
                n, "increment", [0 if i == 7 else 2], {}, f"r{i}", OPERATOR, together=True
            )
            for i, n in enumerate(names)
        ]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    results = asyncio.run_coroutine_threadsafe(forward_all(), a.loop).result(20)
    assert isinstance(results[7], AppError)
    assert [r for i, r in enumerate(results) if i != 7] == [2] * 39
    # (a request is counted once its response is sent: a moment after a has it)
    wait_until(lambda: sent_to_b("/v1/cluster/calls") == 1)
    assert sent_to_b("/v1/cluster/call") == 0
    # sent again (a retry after a lost answer): the replies, not a second increment
    again = asyncio.run_coroutine_threadsafe(forward_all(), a.loop).result(20)
    assert [r for i, r in enumerate(again) if i != 7] == [2] * 39
    wait_until(lambda: sent_to_b("/v1/cluster/calls") == 2)
    time.sleep(0.2)
    assert sent_to_b("/v1/cluster/calls") == 2 and sent_to_b("/v1/cluster/call") == 0
    assert b.call(names[0], "get").result(5) == 2


def test_call_many_answers_each_call_in_order_wherever_its_actor_lives(
    make_node: Callable[..., Node],
) -> None:
    """``Router.call_many`` (a batch of creations): the calls to the entry node's
    actors go to its engine, the others travel together in one request to their
    owner; each call gets its own reply or error, in order, and a refusal or a
    timeout among them fails only that call."""
    a = make_node("a", serve=True, node={"call_timeout_seconds": 1.0})
    b = make_node("b", serve=True)
    wait_until(lambda: balanced(a, b), timeout=10)
    wait_until(lambda: len(a.leases.urls) == 2 and len(b.leases.urls) == 2, timeout=5)
    names: list[ActorName] = []
    for i in range(10_000):  # alternately an actor of a's shards and one of b's
        name = ActorName("probe", f"alice-m{i}")
        owner = a if len(names) % 2 == 0 else b
        if owner.leases.epoch_of(shard_of(name, owner.keys.shard_count)) is not None:
            names.append(name)
        if len(names) == 10:
            break
    wait_until(
        lambda: all(
            a.leases.owner_of(shard_of(n, a.keys.shard_count)) == ("a" if i % 2 == 0 else "b")
            for i, n in enumerate(names)
        ),
        timeout=5,
    )

    def batches_to_b() -> float:
        sample = b.metrics.registry.get_sample_value(
            "troth_http_requests_total",
            {"method": "POST", "route": "/v1/cluster/calls", "status": "200"},
        )
        return sample or 0.0

    before = batches_to_b()
    args: list[list[Any]] = [[i] for i in range(10)]
    args[3] = ["no such argument", "at all"]  # refused: too many arguments (on b)
    out = asyncio.run_coroutine_threadsafe(
        a.router.call_many(names, "set", args, OPERATOR, fresh=[True] * 10), a.loop
    ).result(20)
    assert [o for i, o in enumerate(out) if i != 3] == [r[0] for i, r in enumerate(args) if i != 3]
    assert isinstance(out[3], BadRequestError)
    assert a.call(names[0], "get").result(5)["value"] == 0
    assert b.call(names[1], "get").result(5)["value"] == 1
    wait_until(lambda: batches_to_b() == before + 1)  # b's five calls: one request
    # a's actors nap past a's 1 s call deadline: those calls time out, b's do not
    nap = [[1.5 if i % 2 == 0 else 0.1, f"t{i}"] for i in range(10)]
    slow = asyncio.run_coroutine_threadsafe(
        a.router.call_many(names, "nap", nap, OPERATOR, fresh=[False] * 10), a.loop
    ).result(20)
    assert all(isinstance(o, CallTimeout) for o in slow[0::2])
    assert slow[1::2] == [[f"t{i}"] for i in range(1, 10, 2)]


def test_call_many_retries_a_call_whose_shard_is_not_served_for_a_moment(
    make_node: Callable[..., Node],
) -> None:
    """A call of ``call_many`` that its node refuses without running it (the shard is
    being handed over) is retried as ``call`` would, and answered once it can run."""
    a = make_node("a")
    names = [ActorName("probe", f"alice-r{i}") for i in range(3)]
    held = shard_of(names[1], a.keys.shard_count)
    a.engine._draining.add(held)

    async def many() -> list[object]:
        a.loop.call_later(0.3, a.engine._draining.discard, held)
        return await a.router.call_many(names, "set", [[1], [2], [3]], OPERATOR, fresh=[True] * 3)

    assert asyncio.run_coroutine_threadsafe(many(), a.loop).result(20) == [1, 2, 3]
    assert a.call(names[1], "get").result(5)["value"] == 2


def test_forged_cluster_header_gets_no_special_rights(make_node: Callable[..., Node]) -> None:
    a = make_node("a", serve=True, auth={"api_keys": {"key-alice-0123456789": "alice"}})
    resp = httpx.post(
        f"{a.url}/v1/actors/counter/bob-c/increment", headers={"x-troth-cluster": "guess"}
    )
    assert resp.status_code == 401


def test_joining_node_takes_a_fair_share_while_client_runs(make_node: Callable[..., Node]) -> None:
    a = make_node("a", serve=True)
    errors: list[BaseException] = []
    done = {"n": 0}
    stop = threading.Event()

    def drive() -> None:
        with Client([a.url], timeout=20) as client:
            i = 0
            while not stop.is_set():
                try:
                    client.call(f"counter/alice-j{i % 20}", "increment")
                    done["n"] += 1
                except BaseException as exc:  # any error visible to the client fails the test
                    errors.append(exc)
                i += 1

    t = threading.Thread(target=drive)
    t.start()
    wait_until(lambda: done["n"] > 50, timeout=20)
    b = make_node("b", serve=True)
    wait_until(lambda: balanced(a, b), timeout=15)
    before = done["n"]
    wait_until(lambda: done["n"] > before + 50, timeout=20)
    stop.set()
    t.join(30)
    assert errors == []
    total = sum(
        a.call(ActorName("counter", f"alice-j{i}"), "get").result(10)
        if a.leases.epoch_of(shard_of(ActorName("counter", f"alice-j{i}"), 64)) is not None
        else b.call(ActorName("counter", f"alice-j{i}"), "get").result(10)
        for i in range(20)
    )
    assert total == done["n"]


def test_client_proxy_errors_and_timeout(make_node: Callable[..., Node]) -> None:
    a = make_node("a")
    server = ServerThread(a).start()
    with Client(server.url, timeout=1) as client:
        counter = client.actor("counter", "alice-p")
        assert counter.increment(2) == 2
        with pytest.raises(AppError, match="positive"):
            counter.increment(0)
        server.stop()  # the only node goes away: the call must give up, clearly
        with pytest.raises(CallTimeout, match="request_id"):
            counter.increment(1)
    with pytest.raises(CallTimeout, match="no troth node reachable"):
        Client("http://127.0.0.1:9", timeout=0.5, connect_timeout=0.2)


def test_notifications_in_order_once(make_node: Callable[..., Node]) -> None:
    a = make_node("a", serve=True)

    async def scenario() -> list[Notification]:
        async with AsyncClient(a.url) as client:
            counter = client.actor("counter", "alice-n")
            await counter.increment()
            got: list[Notification] = []

            async def collect() -> None:
                async for note in client.notifications("counter/alice-n"):
                    got.append(note)
                    if len(got) == 5:
                        return

            task = asyncio.create_task(collect())
            for _ in range(4):
                await counter.increment()
            with pytest.raises(AppError):
                await counter.increment(0)  # rolled back: no notification
            await asyncio.wait_for(task, 10)
            return got

    got = asyncio.run(scenario())
    assert [n.data for n in got] == [{"count": i} for i in range(1, 6)]
    assert len({n.id for n in got}) == 5
