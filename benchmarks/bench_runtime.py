"""Committed messages per second on one in-process node, against two baselines
measured in the same run on the same machine:

* ``raw_redis``: the commit script itself, pipelined EVALSHA in batches, no actors:
  the ceiling that troth's persistence can approach;
* ``pykka``: plain pykka actors doing the same increment with no persistence: the
  ceiling of the actor machinery.

Run:  python benchmarks/bench_runtime.py [--messages 20000] [--actors 1,100,1000]
Prints JSON. Figures on a shared 2-core machine are noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import time
import uuid
from concurrent.futures import Future, wait
from typing import Any

import pykka
import redis
from common import emit, machine, redis_server

from troth import codec
from troth.checkpoint import CheckpointStore, CommitRequest
from troth.config import parse_config
from troth.keys import KeySpace
from troth.names import ActorName, shard_of
from troth.node import Node

WINDOW = 4000  # outstanding calls at most, like many concurrent clients


def bench_troth(url: str, actors: int, messages: int) -> float:
    config = parse_config(
        {
            "redis": {"key_prefix": f"b{uuid.uuid4().hex[:8]}"},
            "types": {"counter": {"class": "examples.helloworld.counter:Counter"}},
            "python_path": ["."],
            "plugins": {"session": {}},
        }
    )
    node = Node(config, url, "bench")
    node.start()
    names = [ActorName("counter", f"bench-{i}") for i in range(actors)]
    try:
        wait([node.call(n, "increment") for n in names])  # activate (init + first commit)
        started = time.perf_counter()
        pending: list[Future[Any]] = []
        for i in range(messages):
            pending.append(node.call(names[i % actors], "increment"))
            if len(pending) >= WINDOW:
                wait(pending)
                pending = []
        wait(pending)
        elapsed = time.perf_counter() - started
        assert sum(node.call(n, "get").result(30) for n in names) == actors + messages
    finally:
        node.stop()
    return messages / elapsed


def bench_raw_redis(url: str, messages: int, batch: int = 256) -> float:
    """The same commit script, same payload shape, pipelined without any actor."""
    client = redis.Redis.from_url(url)
    keys = KeySpace(f"r{uuid.uuid4().hex[:8]}", 1024)
    store = CheckpointStore(client, keys, "bench")
    actors = 100
    for s in range(keys.shard_count):
        client.hset(keys.shard(s).lease, mapping={"owner": "bench", "epoch": "1"})
    seqs = [0] * actors
    state = codec.pack({"count": 0})
    started = time.perf_counter()
    done = 0
    while done < messages:
        reqs = []
        for j in range(min(batch, messages - done)):
            a = (done + j) % actors
            name = f"counter/bench-{a}"
            reqs.append(
                CommitRequest(
                    name=name,
                    shard=shard_of(name, 1024),
                    epoch="1",
                    expected_seq=seqs[a],
                    state=state,
                    pstate=b"\x80",
                    version="1.0.0",
                )
            )
            seqs[a] += 1
        results = store.commit_many(reqs)
        assert all(r.ok for r in results)
        done += len(reqs)
    elapsed = time.perf_counter() - started
    client.close()
    return messages / elapsed


class PlainCounter(pykka.ThreadingActor):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def on_receive(self, message: Any) -> int:
        self.count += 1
        return self.count


def bench_pykka(actors: int, messages: int) -> float:
    refs = [PlainCounter.start() for _ in range(actors)]
    try:
        started = time.perf_counter()
        pending = []
        for i in range(messages):
            pending.append(refs[i % actors].ask("inc", block=False))
            if len(pending) >= WINDOW:
                for f in pending:
                    f.get()
                pending = []
        for f in pending:
            f.get()
        return messages / (time.perf_counter() - started)
    finally:
        for r in refs:
            r.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--actors", default="1,100,1000")
    args = ap.parse_args()
    with redis_server() as url:
        raw = bench_raw_redis(url, args.messages)
        rows = []
        for n in (int(x) for x in args.actors.split(",")):
            msgs = args.messages if n > 1 else min(args.messages, 3000)
            troth_rate = bench_troth(url, n, msgs)
            pykka_rate = bench_pykka(n, msgs)
            rows.append(
                {
                    "actors": n,
                    "messages": msgs,
                    "troth_msgs_per_s": round(troth_rate),
                    "pykka_msgs_per_s": round(pykka_rate),
                    "ratio_to_raw_redis": round(troth_rate / raw, 3),
                    "ratio_to_pykka": round(troth_rate / pykka_rate, 3),
                }
            )
    emit(
        {
            "benchmark": "runtime",
            "machine": machine(),
            "raw_redis_commits_per_s": round(raw),
            "results": rows,
        }
    )


if __name__ == "__main__":
    main()
