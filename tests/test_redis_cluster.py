"""troth on a real Redis Cluster (3 masters, each with a replica) while masters fail
over: nothing a client saw acknowledged is lost, and nothing is done twice.

The kill -9, SIGSTOP and commitment-drain tests also run on a cluster (marked
``on_cluster_too``); these tests move or kill the masters themselves, so each has a
cluster of its own.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial

import httpx
import pytest
from redis.crc import key_slot

from conftest import NodeProcess, base_config, wait_until
from troth.core.config import parse_config
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of
from troth.core.redis_clients import cluster_url, discovered_client, redis_client
from troth.edge import admin
from troth.edge.local_cluster import LocalCluster
from troth.node import Node

COUNTERS = [f"alice-f{i}" for i in range(12)]  # spread over shards, so over masters


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(masters=3, replicas=1) as c:
        yield c


@pytest.fixture
def redis_url(cluster: LocalCluster) -> str:
    return cluster.url


class Load:
    """Client threads incrementing counters through one node, each request retried
    under its one request_id until it is answered (as a real client does)."""

    def __init__(self, url: str, workers: int = 6) -> None:
        self.url = url
        self.acked: Counter[str] = Counter()
        self.retried = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()  # no new requests
        self.abandon = threading.Event()  # no more retries either (the test failed)
        self.threads = [threading.Thread(target=self._run, args=(w,)) for w in range(workers)]
        for t in self.threads:
            t.start()

    def _run(self, worker: int) -> None:
        with httpx.Client(timeout=10) as http:
            i = 0
            while not self.stop.is_set():
                counter = COUNTERS[(worker * 5 + i) % len(COUNTERS)]
                body = {"args": [1], "request_id": f"w{worker}-{i}"}
                while not self.abandon.is_set():
                    try:
                        resp = http.post(
                            f"{self.url}/v1/actors/counter/{counter}/increment", json=body
                        )
                        if resp.status_code == 200:
                            with self.lock:
                                self.acked[counter] += 1
                            break
                    except httpx.HTTPError:
                        pass
                    with self.lock:
                        self.retried += 1
                    time.sleep(0.05)
                i += 1

    def grew(self, to: int) -> bool:
        return self.total() >= to

    def total(self) -> int:
        with self.lock:
            return sum(self.acked.values())

    def finish(self) -> None:
        """Stop after each worker's request in hand is answered (within 30 s)."""
        self.stop.set()
        deadline = time.monotonic() + 30
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.abandon.set()
        for t in self.threads:
            t.join(timeout=15)


def values(url: str) -> dict[str, int]:
    return {
        c: httpx.post(f"{url}/v1/actors/counter/{c}/get", json={}, timeout=10).json()["result"]
        for c in COUNTERS
    }


@pytest.mark.slow
def test_planned_failover_of_every_master_under_load_loses_nothing(
    cluster: LocalCluster, spawn: Callable[..., NodeProcess]
) -> None:
    node = spawn("p1").start()
    load = Load(node.url)
    try:
        for replica in cluster.servers[cluster.masters :]:
            wait_until(partial(load.grew, load.total() + 50), timeout=30)
            cluster.failover(replica.port)  # it catches up, then takes its master's slots
        start = load.total()
        wait_until(lambda: load.total() >= start + 100, timeout=30)
    finally:
        load.finish()
    moved = {s.port for s in cluster.servers[cluster.masters :]}
    assert set(cluster.master_ports()) == moved, "every replica is a master now"
    assert values(node.url) == {c: load.acked[c] for c in COUNTERS}


@pytest.mark.slow
def test_killed_master_loses_nothing_acknowledged_with_wait_replicas(
    cluster: LocalCluster, spawn: Callable[..., NodeProcess]
) -> None:
    node = spawn("p1", redis={"wait_replicas": 1}).start()
    load = Load(node.url)
    try:
        wait_until(lambda: load.total() >= 100, timeout=30)
        victim = cluster.servers[0].port
        cluster.kill(victim)  # SIGKILL: its replica is promoted after the node timeout
        wait_until(lambda: victim not in cluster.master_ports() and cluster.is_ok(), timeout=30)
        # The promoted master has no replica: its slots' commits wait (503s, retried)
        # until the operator brings the dead server back, as its new replica.
        cluster.restart(victim)
        at_restart = load.total()
        wait_until(lambda: load.total() >= at_restart + 100, timeout=60)
    finally:
        load.finish()
    assert victim not in cluster.master_ports()
    assert load.retried, "the kill interrupted no request: the test proved nothing"
    # Every acknowledged commit was on a replica first (WAIT): the one that took over
    # has them all, and the retried ones ran once.
    assert values(node.url) == {c: load.acked[c] for c in COUNTERS}


def test_a_plain_url_of_any_cluster_node_is_enough(cluster: LocalCluster, prefix: str) -> None:
    """``redis://`` of one node (not the seed): troth asks the server and goes
    cluster-wide; its actors' keys land on every master, and status reads them all."""
    plain = f"redis://127.0.0.1:{cluster.servers[1].port}"
    assert cluster_url(plain) == plain
    node = Node(parse_config(base_config(prefix)), plain, "n1")
    node.start()
    try:
        for i in range(30):
            name = ActorName("counter", f"alice-u{i}")
            assert node.call(name, "increment", [i + 1]).result(10) == i + 1
        client = discovered_client(plain)
        # (a shard counts as served once its owner's next heartbeat says so)
        status = wait_until(
            lambda: (s := admin.status(client, node.keys))["unserved_shards"] == 0 and s
        )
        assert status["actors"] == 30
        owners = set()
        for port in cluster.master_ports():
            with redis_client(f"redis://127.0.0.1:{port}") as one:
                if any(one.scan_iter(match=f"{prefix}:*:ca:*", count=1000)):
                    owners.add(port)
        assert len(owners) == 3, "checkpoints are spread over every master"
        client.close()
    finally:
        node.stop()


@pytest.mark.slow
def test_resharding_under_load_loses_nothing(
    cluster: LocalCluster, spawn: Callable[..., NodeProcess], prefix: str
) -> None:
    """Slots move between masters while counters are called: commands meet the slots
    half moved (``ASK``, ``TRYAGAIN``) and then moved (``MOVED``), and every
    acknowledged increment is there once."""
    node = spawn("p1").start()
    load = Load(node.url)
    try:
        wait_until(partial(load.grew, 50), timeout=30)
        masters = cluster.master_ports()
        for i, counter in enumerate(COUNTERS[:3]):
            name = ActorName("counter", counter)
            key = KeySpace(prefix, 64).shard(shard_of(name, 64)).checkpoint(str(name))
            slot = key_slot(key.encode())
            target = masters[i % len(masters)]
            with redis_client(cluster.url) as rc:
                if rc.get_node_from_key(key).port == target:
                    target = masters[(i + 1) % len(masters)]
            moved = cluster.migrate_slot(slot, target, pause=0.2)
            assert moved >= 1
            wait_until(partial(load.grew, load.total() + 30), timeout=30)
    finally:
        load.finish()
    assert values(node.url) == {c: load.acked[c] for c in COUNTERS}
    metrics = httpx.get(f"{node.url}/metrics").text
    half_moved = ('reply="ASK"', 'reply="TRYAGAIN"')  # one key moved, or some of a script's
    assert any(f"troth_redis_redirects_total{{{r}}}" in metrics for r in half_moved), (
        "no command met a slot half moved"
    )
    assert 'troth_redis_redirects_total{reply="MOVED"}' in metrics
