"""Activating many actors on one node: how fast, how much memory, how many threads.

* ``create``: N new actors, each created by its first call (``init`` and the first
  commit), driven from the node's loop with 2,000 calls outstanding;
* ``load``: the same N actors activated again on a fresh node, from their
  checkpoints, by a read (which commits nothing);
* ``rss_per_idle_actor_bytes``: the node process's resident memory growth divided by
  N, once all N are active and idle; ``threads``: the process's thread count then.

Run:  python benchmarks/bench_activation.py [--actors 100000]
Prints JSON; run it alone on the machine (RSS is of this process).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import threading
import time
import uuid
from typing import Any

from common import emit, machine, redis_server, rss_bytes, windowed

from troth.core.access import OPERATOR
from troth.core.config import parse_config
from troth.core.names import ActorName
from troth.edge.server import tune_gc
from troth.node import Node

WINDOW = 2000


def make_node(url: str, prefix: str) -> Node:
    config = parse_config(
        {
            "redis": {"key_prefix": prefix},
            "types": {"counter": {"class": "examples.helloworld.counter:AsyncCounter"}},
            "python_path": ["."],
            "runtime": {"max_mailbox": 10},
        }
    )
    node = Node(config, url, f"bench-{uuid.uuid4().hex[:4]}")
    node.start()
    tune_gc()  # as troth serve does
    return node


def activate(node: Node, names: list[ActorName], method: str) -> float:
    async def drive() -> float:
        return await windowed(
            len(names),
            lambda i: node.engine.call(names[i], method, [], {}, None, OPERATOR),
            WINDOW,
        )

    return float(asyncio.run_coroutine_threadsafe(drive(), node.loop).result())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--actors", type=int, default=100_000)
    args = ap.parse_args()
    names = [ActorName("counter", f"bench-{i}") for i in range(args.actors)]
    prefix = f"a{uuid.uuid4().hex[:8]}"
    result: dict[str, Any] = {
        "benchmark": "activation",
        "machine": machine(),
        "actors": args.actors,
    }
    with redis_server() as url:
        node = make_node(url, prefix)
        try:
            created = activate(node, names, "increment")
        finally:
            node.stop()
        result["create_per_s"] = round(args.actors / created)
        gc.collect()
        node = make_node(url, prefix)
        try:
            before = rss_bytes()
            loaded = activate(node, names, "get")
            gc.collect()
            time.sleep(1)
            grown = rss_bytes() - before
            result.update(
                load_per_s=round(args.actors / loaded),
                active_actors=node.active_actors,
                rss_per_idle_actor_bytes=round(grown / args.actors),
                threads=threading.active_count(),
            )
        finally:
            node.stop()
    emit(result)


if __name__ == "__main__":
    main()
