"""Operators rebalance by killing processes: real `troth serve` nodes, SIGKILL, SIGSTOP."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import redis

from conftest import NodeProcess, Receiver, on_cluster_too, wait_until
from troth.client import AsyncClient, Client, Notification
from troth.core import codec
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of
from troth.edge import admin

SHARDS = 64


def owner(rclient: redis.Redis, prefix: str, name: ActorName) -> str:
    lease = KeySpace(prefix, SHARDS).shard(shard_of(name, SHARDS)).lease
    return (rclient.hget(lease, "owner") or b"").decode()


def actor_owned_by(rclient: redis.Redis, prefix: str, node_id: str, type_: str) -> ActorName:
    for i in range(10_000):
        name = ActorName(type_, f"alice-{i}")
        if owner(rclient, prefix, name) == node_id:
            return name
    raise AssertionError(f"{node_id} owns nothing")


def seq(rclient: redis.Redis, prefix: str, name: ActorName) -> int:
    key = KeySpace(prefix, SHARDS).shard(shard_of(name, SHARDS)).checkpoint(str(name))
    return int(rclient.hget(key, "seq") or 0)


def balanced(rclient: redis.Redis, prefix: str, node_ids: list[str]) -> bool:
    keys = KeySpace(prefix, SHARDS)
    owners = Counter(
        (rclient.hget(keys.shard(s).lease, "owner") or b"").decode() for s in range(SHARDS)
    )
    share = -(-SHARDS // len(node_ids))  # ceil: no node holds more than its fair share
    return sum(owners[n] for n in node_ids) == SHARDS and all(
        share - 3 <= owners[n] <= share for n in node_ids
    )


@pytest.mark.slow
@pytest.mark.parametrize("sessions", ["a session per caller", "one pipelined session"])
def test_kill9_churn_over_200_counters_loses_and_doubles_nothing(
    spawn: Callable[..., NodeProcess], rclient: redis.Redis, prefix: str, sessions: str
) -> None:
    """Callers keep incrementing 200 counters while nodes are killed and come back:
    6 threads with a client each, or 48 callers sharing one asyncio client (its calls
    go out in batch frames, and are resent together after a reconnect)."""
    nodes = [spawn(f"p{i}").start() for i in range(3)]
    urls = [n.url for n in nodes]
    acked: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []

    def drive(worker: int) -> None:
        rng = random.Random(worker)
        with Client(rng.sample(urls, len(urls)), timeout=30) as client:
            while not stop.is_set():
                counter = f"counter/alice-k{rng.randrange(200)}"
                try:
                    client.call(counter, "increment")
                except BaseException as exc:
                    failures.append(exc)
                    return
                with lock:
                    acked[counter] += 1

    def pipelined() -> None:
        async def caller(client: AsyncClient, rng: random.Random) -> None:
            while not stop.is_set():
                counter = f"counter/alice-k{rng.randrange(200)}"
                await client.call(counter, "increment")
                with lock:
                    acked[counter] += 1

        async def run() -> None:
            async with AsyncClient(urls, timeout=30) as client:
                await asyncio.gather(*(caller(client, random.Random(c)) for c in range(48)))

        try:
            asyncio.run(run())
        except BaseException as exc:
            failures.append(exc)

    if sessions == "one pipelined session":
        workers = [threading.Thread(target=pipelined)]
    else:
        workers = [threading.Thread(target=drive, args=(w,)) for w in range(6)]
    for t in workers:
        t.start()

    def progressed(by: int) -> None:
        with lock:
            done = sum(acked.values())
        wait_until(lambda: sum(acked.values()) >= done + by, timeout=60)

    rng = random.Random(7)
    for _ in range(4):
        progressed(100)  # work goes on between kills, whatever it takes
        victim = rng.choice(nodes)
        victim.kill()
        time.sleep(0.2)  # back before its lease expires, under the same id
        victim.start(wait_shards=False)
    keys = KeySpace(prefix, SHARDS)
    wait_until(lambda: admin.status(rclient, keys)["unserved_shards"] == 0, timeout=15)
    progressed(100)
    stop.set()
    for t in workers:
        t.join(60)
    assert failures == []
    assert sum(acked.values()) > 200
    with httpx.Client(timeout=30) as http:
        for i in range(200):
            name = f"counter/alice-k{i}"
            got = http.post(f"{nodes[i % 3].url}/v1/actors/{name}/get").json()
            expected = acked[name]
            if expected == 0:
                assert got.get("result", 0) == 0
            else:
                assert got == {"result": expected}, name


@pytest.mark.slow
@on_cluster_too
def test_paused_node_commits_nothing_and_sends_nothing(
    spawn: Callable[..., NodeProcess], rclient: redis.Redis, prefix: str, receiver: Receiver
) -> None:
    p1 = spawn("p1").start()
    p2 = spawn("p2").start()
    wait_until(lambda: balanced(rclient, prefix, ["p1", "p2"]), timeout=20)
    name = actor_owned_by(rclient, prefix, "p1", "probe")
    url = f"{p1.url}/v1/actors/{name}"
    httpx.post(f"{url}/set", json={"args": [10]})

    replies: list[httpx.Response | Exception] = []

    def slow() -> None:
        try:
            replies.append(
                httpx.post(f"{url}/slow_hook", json={"args": [receiver.url, 3.0]}, timeout=30)
            )
        except Exception as exc:
            replies.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.5)  # the method runs: it buffered a webhook and a state change
    assert p1.proc is not None
    os.kill(p1.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: owner(rclient, prefix, name) == "p2", timeout=20)
    finally:
        os.kill(p1.proc.pid, signal.SIGCONT)
    t.join(30)
    # p1's commit was refused by fencing, so its buffered webhook was dropped...
    fenced = re.compile(r'troth_rollbacks_total\{cause="FencedError",type="probe"\} [1-9]')
    wait_until(lambda: fenced.search(httpx.get(f"{p1.url}/metrics").text), timeout=10)
    # ...and the call, retried by p1's router with the same request_id on the new
    # owner p2, ran there exactly once: one commit, one webhook, nothing doubled.
    assert isinstance(replies[0], httpx.Response) and replies[0].json() == {"result": 11}
    wait_until(lambda: receiver.count() == 1)
    time.sleep(1.0)
    assert receiver.count() == 1
    state = httpx.post(f"{p2.url}/v1/actors/{name}/get").json()["result"]
    assert state["value"] == 11


@pytest.mark.slow
def test_2000_autonomous_actors_pulse_again_within_lease_ttl_after_kill9(
    spawn: Callable[..., NodeProcess], rclient: redis.Redis, prefix: str
) -> None:
    """Every autonomous actor of a killed node pulses again on the survivor, with no
    traffic, within the lease TTL (2 s here) + 2 s. They pulse every 5 s, so a pulse
    after the kill is one that the takeover caused (and the nodes stay lightly loaded
    while the suite runs in parallel)."""
    slow = {
        "types": {
            "heartbeat": {"class": "examples.autonomous.heartbeat:Heartbeat", "pulse_seconds": 5}
        }
    }
    p1 = spawn("p1", **slow).start()
    p2 = spawn("p2", **slow).start()
    wait_until(lambda: balanced(rclient, prefix, ["p1", "p2"]), timeout=20)
    names = [f"heartbeat/alice-{i}" for i in range(2000)]

    async def wake_all() -> None:
        async with AsyncClient([p1.url, p2.url], timeout=60) as client:
            for i in range(0, len(names), 500):
                await asyncio.gather(*(client.call(n, "wake") for n in names[i : i + 500]))

    asyncio.run(wake_all())
    on_p1 = [n for n in names if owner(rclient, prefix, ActorName.parse(n)) == "p1"]
    assert len(on_p1) > 500
    keys = KeySpace(prefix, SHARDS)

    def last_pulses() -> list[int]:
        pipe = rclient.pipeline(transaction=False)
        for n in on_p1:
            pipe.hget(keys.shard(shard_of(ActorName.parse(n), SHARDS)).checkpoint(n), "state")
        return [codec.unpack(raw)["last_pulse_ms"] if raw else 0 for raw in pipe.execute()]

    wait_until(lambda: min(last_pulses()) > 0, timeout=20)  # all pulsed once on p1
    p1.kill()
    killed_ms = int(time.time() * 1000)
    wait_until(lambda: min(last_pulses()) > killed_ms, timeout=15)
    recovered = (int(time.time() * 1000) - killed_ms) / 1000
    assert recovered < 2 + 2, recovered
    assert all(owner(rclient, prefix, ActorName.parse(n)) == "p2" for n in on_p1)
    assert httpx.get(f"{p2.url}/health").json()["active_actors"] >= 2000


@pytest.mark.slow
def test_fourth_node_joins_without_client_errors(
    spawn: Callable[..., NodeProcess], rclient: redis.Redis, prefix: str
) -> None:
    nodes = [spawn(f"p{i}").start() for i in range(3)]
    wait_until(lambda: balanced(rclient, prefix, ["p0", "p1", "p2"]), timeout=20)
    done = Counter[str]()
    errors: list[BaseException] = []
    stop = threading.Event()

    def drive() -> None:
        with Client([n.url for n in nodes], timeout=30) as client:
            i = 0
            while not stop.is_set():
                try:
                    client.call(f"counter/alice-f{i % 50}", "increment")
                    done[f"counter/alice-f{i % 50}"] += 1
                except BaseException as exc:
                    errors.append(exc)
                    return
                i += 1

    t = threading.Thread(target=drive)
    t.start()
    wait_until(lambda: sum(done.values()) > 100, timeout=20)
    spawn("p3").start()
    wait_until(lambda: balanced(rclient, prefix, ["p0", "p1", "p2", "p3"]), timeout=30)
    n = sum(done.values())
    wait_until(lambda: sum(done.values()) > n + 100, timeout=20)
    stop.set()
    t.join(30)
    assert errors == []
    with httpx.Client() as http:
        for name, count in done.items():
            assert http.post(f"{nodes[0].url}/v1/actors/{name}/get").json() == {"result": count}


def test_notifications_survive_a_node_kill_exactly_once_in_order(
    spawn: Callable[..., NodeProcess],
) -> None:
    p1 = spawn("p1").start()
    p2 = spawn("p2").start()
    got: list[Notification] = []
    with Client([p1.url], timeout=30) as listener, Client([p2.url], timeout=30) as driver:
        listener.subscribe("counter/alice-n", got.append)
        acked = 0
        for i in range(60):
            driver.call("counter/alice-n", "increment")
            acked += 1
            if i == 20:
                p1.kill()  # the listener's node: it must reconnect to p2 and resume
        wait_until(lambda: len(got) >= acked, timeout=20)
        time.sleep(0.5)
        assert listener.reconnects >= 1
    assert [n.data["count"] for n in got] == list(range(1, acked + 1))
    assert len({n.id for n in got}) == acked


def test_a_quick_restart_under_the_same_id_adopts_every_lease_it_held(
    spawn: Callable[..., NodeProcess], rclient: redis.Redis, prefix: str
) -> None:
    """Node a was killed while it held every shard (more than its fair share) and is
    restarted with the same id before its lease expires. It must serve all of them
    again, not only its share: no other node may claim a lease held by a live node.
    The lease TTL is 30 s, so that no expiry can hide the bug."""
    slow = {"cluster": {"lease_ttl_seconds": 30, "heartbeat_seconds": 0.5}}
    keys = KeySpace(prefix, SHARDS)
    rclient.zadd(keys.nodes, {"a": int(time.time() * 1000) + 30_000})
    for s in range(SHARDS):
        rclient.hset(keys.shard(s).lease, mapping={"owner": "a", "epoch": "1"})
    b = spawn("b", **slow).start(wait_shards=False)
    wait_until(lambda: admin.status(rclient, keys)["nodes"][1:], timeout=10)
    # a counts as live in Redis but serves nothing: status must not call it served
    assert admin.status(rclient, keys)["unserved_shards"] == SHARDS
    spawn("a", **slow).start()
    wait_until(lambda: admin.status(rclient, keys)["unserved_shards"] == 0, timeout=15)
    with httpx.Client(timeout=10) as http:
        for i in range(16):
            resp = http.post(f"{b.url}/v1/actors/counter/alice-q{i}/increment", json={})
            assert resp.json() == {"result": 1}, resp.text
    # and the fair share comes back by graceful handoff, every shard served again (a
    # node publishes what it serves with its next heartbeat, 0.5 s here)
    wait_until(lambda: balanced(rclient, prefix, ["a", "b"]), timeout=20)
    wait_until(lambda: admin.status(rclient, keys)["unserved_shards"] == 0, timeout=3)
