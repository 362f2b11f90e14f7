"""Soak: many kill -9 rounds across three `troth serve` processes under steady load.

Excluded from the default run (``pytest -m soak``; about a minute). Every round kills
one node with SIGKILL while clients keep incrementing counters through whichever
node answers, then brings a node back under a fresh id. At the end every
acknowledged increment is present exactly once.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from conftest import NodeProcess, wait_until

pytestmark = pytest.mark.soak

ROUNDS = 12
COUNTERS = [f"alice-s{i}" for i in range(16)]


def test_repeated_kill9_rounds_lose_and_double_nothing(
    spawn: Callable[..., NodeProcess],
) -> None:
    nodes = [spawn(f"s{i}").start(wait_shards=i == 0) for i in range(3)]
    acked: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        rng = random.Random(worker)
        i = 0
        while not stop.is_set():
            counter = rng.choice(COUNTERS)
            body = {"args": [1], "request_id": f"w{worker}-{i}"}
            while True:  # retry the same request_id, on any node, until answered
                url = rng.choice([n.url for n in nodes])
                try:
                    r = httpx.post(f"{url}/v1/actors/counter/{counter}/increment", json=body)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            with lock:
                acked[counter] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    rng = random.Random(7)

    def progressed(by: int) -> None:
        done = sum(acked.values())
        wait_until(lambda: sum(acked.values()) >= done + by, timeout=60)

    for round_ in range(ROUNDS):
        progressed(50)
        victim = rng.randrange(len(nodes))
        nodes[victim].kill()
        nodes[victim] = spawn(f"s{victim}-{round_}").start(wait_shards=False)
    progressed(50)
    stop.set()
    for t in threads:
        t.join(timeout=60)

    url = nodes[0].url
    for counter in COUNTERS:
        got = httpx.post(f"{url}/v1/actors/counter/{counter}/get", json={}, timeout=30)
        assert got.json()["result"] == acked[counter], counter
