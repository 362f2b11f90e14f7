"""Committed messages per second on one in-process node, against the raw commit
script measured in the same run on the same machine and Redis.

* for 100 actors and more: the commit script itself (``lua/commit.lua``), the same
  payload shape, sent through the same group-commit batcher with 1,000 actors'
  worth of commits outstanding, and no actor: the ceiling that troth's persistence
  allows;
* for the single actor called sequentially: one commit after another, each
  awaited: one EVALSHA round trip.

The baseline is measured again around every row (before and after it), and each
ratio is against the mean of the two: on a shared machine whose speed drifts by a
third within minutes, one baseline at the start made the last rows' ratios say more
about the machine than about troth (the measurements are in the row's ``raw``).
With ``--rounds N`` each row is measured N times so, and reports the medians.

troth's figures drive ``Engine.call`` from the node's own event loop, so they
measure the engine, not a thread hand-off of the benchmark's own making. Each
message is a real ``increment`` of the helloworld counter (``async def`` and plain
``def`` variants, and plain ``def`` on a node pinned to one CPU: ``runtime.cpu``),
committed with its state, sequence number and reply.

Run:  python benchmarks/bench_runtime.py [--messages 20000] [--actors 1,100,1000,10000]
      [--rounds 1]
Prints JSON. Figures on a shared 2-core machine are noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

from common import emit, machine, redis_server, windowed

from troth.core import codec
from troth.core.access import OPERATOR
from troth.core.batcher import Batcher
from troth.core.checkpoint import CheckpointStore, CommitRequest
from troth.core.config import parse_config
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of
from troth.core.redis_clients import async_redis_client, redis_client
from troth.edge.server import tune_gc
from troth.node import Node

WINDOW = 2000  # outstanding calls at most, like many concurrent clients


#: (name, actor type, runtime.cpu): ``async def`` and plain ``def`` methods, and plain
#: ``def`` with the node pinned to one CPU (its first), where handing a call to a
#: worker thread and back costs a fraction of what it costs across CPUs.
VARIANTS = (
    ("async", "acounter", None),
    ("sync", "counter", None),
    (
        "sync_pinned",
        "counter",
        min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    ),
)


def run_on(node: Node, coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, node.loop).result()


def bench_troth(
    url: str, actors: int, messages: int, type_: str, sequential: bool, cpu: int | None = None
) -> float:
    config = parse_config(
        {
            "redis": {"key_prefix": f"b{uuid.uuid4().hex[:8]}"},
            "runtime": {"cpu": cpu},
            "types": {
                "counter": {"class": "examples.helloworld.counter:Counter"},
                "acounter": {"class": "examples.helloworld.counter:AsyncCounter"},
            },
            "python_path": ["."],
            "plugins": {"session": {}},
        }
    )
    node = Node(config, url, "bench")
    node.start()
    tune_gc()  # as troth serve does
    engine = node.engine
    names = [ActorName(type_, f"bench-{i}") for i in range(actors)]

    def call(name: ActorName, method: str) -> Any:
        return engine.call(name, method, [], {}, None, OPERATOR)

    async def drive() -> float:
        await windowed(actors, lambda i: call(names[i], "increment"), WINDOW)  # create them
        if sequential:
            started = time.perf_counter()
            for i in range(messages):
                await call(names[i % actors], "increment")
            return time.perf_counter() - started
        return await windowed(messages, lambda i: call(names[i % actors], "increment"), WINDOW)

    try:
        elapsed = run_on(node, drive())
        total = sum(node.call(n, "get").result(30) for n in names)
        assert total == actors + messages, total
    finally:
        node.stop()
    return messages / float(elapsed)


def bench_raw(url: str, messages: int, sequential: bool) -> float:
    """The same commit script and payload shape through the same batcher, no actors."""
    keys = KeySpace(f"r{uuid.uuid4().hex[:8]}", 1024)
    sync = redis_client(url)
    pipe = sync.pipeline(transaction=False)
    for s in range(keys.shard_count):
        pipe.hset(keys.shard(s).lease, mapping={"owner": "bench", "epoch": "1"})
    pipe.execute()
    sync.close()
    chains = 1 if sequential else 1000  # actors, each committing one after another
    state = codec.pack({"count": 0})

    async def drive() -> float:
        client = async_redis_client(url, 5.0)
        store = CheckpointStore(Batcher(client, timeout=30), keys, "bench")

        async def commit(a: int, seq: int, i: int) -> None:
            name = f"counter/bench-{a}"
            result = await store.commit(
                CommitRequest(
                    name=name,
                    shard=shard_of(name, 1024),
                    epoch="1",
                    expected_seq=seq,
                    state=state,
                    pstate=b"\x80",
                    version="1.0.0",
                    replies=[(f"r{i}", codec.pack([i]))],
                )
            )
            assert result.ok, result

        async def chain(a: int) -> None:
            for seq in range(messages // chains):
                await commit(a, seq, a * messages + seq)

        try:
            started = time.perf_counter()
            await asyncio.gather(*(chain(a) for a in range(chains)))
            return time.perf_counter() - started
        finally:
            await client.aclose()

    tune_gc()
    return messages / asyncio.run(drive())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--actors", default="1,100,1000,10000")
    ap.add_argument("--rounds", type=int, default=1, help="measurements a row (medians)")
    args = ap.parse_args()
    with redis_server() as url:
        rows = []
        for n in (int(x) for x in args.actors.split(",")):
            sequential = n == 1
            msgs = min(args.messages, 5000) if sequential else args.messages
            row: dict[str, Any] = {"actors": n, "messages": msgs, "sequential": sequential}
            raws: list[int] = []
            rates: dict[str, list[float]] = {kind: [] for kind, _, _ in VARIANTS}
            ratios: dict[str, list[float]] = {kind: [] for kind, _, _ in VARIANTS}
            for _ in range(args.rounds):
                before = bench_raw(url, msgs, sequential)
                got = {
                    kind: bench_troth(url, n, msgs, type_, sequential, cpu)
                    for kind, type_, cpu in VARIANTS
                }
                after = bench_raw(url, msgs, sequential)
                raws += [round(before), round(after)]
                for kind, rate in got.items():
                    rates[kind].append(rate)
                    ratios[kind].append(rate / ((before + after) / 2))
            row["raw"] = raws
            for kind in rates:
                row[f"{kind}_msgs_per_s"] = round(statistics.median(rates[kind]))
                row[f"{kind}_ratio_to_raw"] = round(statistics.median(ratios[kind]), 3)
            rows.append(row)
    emit(
        {
            "benchmark": "runtime",
            "machine": machine(),
            "results": rows,
        }
    )


if __name__ == "__main__":
    main()
