"""kill -9 of a real `troth serve` process: nothing committed is lost or doubled."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import redis

from conftest import NodeProcess, Receiver, on_cluster_too, wait_until
from troth.core.keys import KeySpace
from troth.core.names import ActorName
from troth.edge import admin

COUNTERS = [f"alice-k{i}" for i in range(4)]


def post(
    url: str, actor: str, method: str, body: dict[str, object], timeout: float = 5
) -> httpx.Response:
    return httpx.post(f"{url}/v1/actors/{actor}/{method}", json=body, timeout=timeout)


@pytest.mark.slow
@on_cluster_too
def test_kill9_under_increments_loses_and_doubles_nothing(
    spawn: Callable[..., NodeProcess],
) -> None:
    node = spawn("p1").start()
    current = {"url": node.url}
    acked: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    retried = Counter[str]()

    def client(worker: int) -> None:
        i = 0
        while not stop.is_set():
            counter = COUNTERS[(worker + i) % len(COUNTERS)]
            rid = f"w{worker}-{i}"
            while True:  # a real client: retry the same request_id until it is answered
                try:
                    resp = post(
                        current["url"],
                        f"counter/{counter}",
                        "increment",
                        {"args": [1], "request_id": rid},
                    )
                    if resp.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                with lock:
                    retried[rid] += 1
                time.sleep(0.05)
            with lock:
                acked[counter] += 1
            i += 1

    # three clients a counter: calls queue up, and often commit in groups
    threads = [threading.Thread(target=client, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    wait_until(lambda: sum(acked.values()) >= 100, timeout=30)
    node.kill()
    killed_at = sum(acked.values())
    time.sleep(0.5)
    # Restart under a new node id: it must wait for the dead node's lease to expire.
    survivor = spawn("p2")
    survivor.start()
    current["url"] = survivor.url
    wait_until(lambda: sum(acked.values()) >= killed_at + 100, timeout=30)
    stop.set()
    for t in threads:
        t.join(timeout=60)

    assert retried, "the kill interrupted no request: the test proved nothing"
    for counter in COUNTERS:
        resp = post(survivor.url, f"counter/{counter}", "get", {})
        assert resp.json()["result"] == acked[counter], counter


def test_committed_webhook_survives_kill9_with_same_idempotency_key(
    spawn: Callable[..., NodeProcess], receiver: Receiver
) -> None:
    node = spawn("p1").start()
    receiver.script = ["hang"]  # the first attempt never gets an answer
    resp = post(node.url, "probe/alice-p", "hook", {"args": [receiver.url + "/pay", {"n": 1}]})
    assert resp.status_code == 200
    entry_id = resp.json()["result"]
    wait_until(lambda: receiver.count() == 1)
    node.kill()  # mid-attempt: the ledger says "attempting", outcome unknown
    node.start()  # same node id: reclaims its shards at once
    wait_until(lambda: receiver.count() == 2, timeout=20)
    keys = [r.headers["idempotency-key"] for r in receiver.requests]
    assert keys == [entry_id, entry_id]
    state = wait_until(
        lambda: post(node.url, "probe/alice-p", "get", {}).json()["result"]["results"]
    )
    assert len(state) == 1 and state[0]["ok"] and state[0]["attempts"] == 2


@pytest.mark.slow
def test_committed_webhook_is_sent_after_kill9_before_dispatch(
    spawn: Callable[..., NodeProcess], receiver: Receiver, rclient: redis.Redis, prefix: str
) -> None:
    """The receiver is down when the commit happens; the node dies; the effect still happens."""
    node = spawn("p1").start()
    dead_url = "http://127.0.0.1:9/down"  # nothing listens on port 9
    retry = {"max_attempts": 10, "initial_delay_seconds": 1, "backoff": "fixed"}
    resp = post(
        node.url,
        "probe/alice-p",
        "hook",
        {"args": [dead_url, {"n": 1}], "kwargs": {"retry": retry}},
    )
    entry_id = resp.json()["result"]
    node.kill()
    keys = KeySpace(prefix, 64)
    data = admin.inspect(rclient, keys, ActorName.parse("probe/alice-p"))
    assert data is not None and [e["id"] for e in data["outbox"]] == [entry_id]
    # Point the entry at the live receiver, as an operator fixing a DNS record would.
    sk = keys.shard(data["shard"])
    from troth.core import codec

    raw = codec.unpack(rclient.hget(sk.outbox, entry_id))
    raw["spec"]["url"] = receiver.url + "/pay"
    rclient.hset(sk.outbox, entry_id, codec.pack(raw))
    node.start()
    wait_until(lambda: receiver.count() == 1, timeout=20)
    assert receiver.requests[0].headers["idempotency-key"] == entry_id
    time.sleep(1.5)
    assert receiver.count() == 1


@pytest.mark.slow
def test_timer_fires_once_after_kill9_and_reports_lateness(
    spawn: Callable[..., NodeProcess],
) -> None:
    node = spawn("p1").start()
    post(node.url, "probe/alice-t", "after", {"args": [1.0, "wake"]})
    node.kill()
    time.sleep(2.5)  # the timer falls due while no node runs
    node.start()
    fired = wait_until(
        lambda: post(node.url, "probe/alice-t", "get", {}).json()["result"]["fired"], timeout=20
    )
    time.sleep(1.0)
    fired = post(node.url, "probe/alice-t", "get", {}).json()["result"]["fired"]
    assert len(fired) == 1
    assert fired[0]["name"] == "wake"
    assert fired[0]["lateness"] >= 1.0
    assert post(node.url, "probe/alice-t", "timers", {}).json()["result"] == {}
