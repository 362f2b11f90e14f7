"""What each kind of Redis key costs: ``MEMORY USAGE`` of every key troth wrote, by
kind (the layout of ``troth.core.keys`` and ``troth.caas.index``).

The scenario: ``--actors`` counters called three times each under request ids (so
each keeps three cached replies), then as many commitments due in an hour, and as
many waiting for one event type. Each key is classified by its pattern (``{sN}``
and names replaced by ``*``); the report gives per kind the number of keys, their
total bytes and the bytes per key, and per actor or commitment what its keys cost.
Shared per-shard structures (outbox, timers, member sets) are counted in full and
divided by the number of entries they hold.

Run:  python benchmarks/bench_key_costs.py [--actors 1000]
Prints JSON. Bytes are Redis's own estimate (``MEMORY USAGE ... SAMPLES 0``) on the
server ``troth serve`` would start, with its memory settings.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from common import emit, machine, redis_server

from troth.core.access import Caller
from troth.core.config import parse_config
from troth.core.names import ActorName
from troth.core.redis_clients import redis_client
from troth.edge.embedded_redis import redis_binary
from troth.edge.server import ServerThread
from troth.node import Node

ROOT = Path(__file__).resolve().parent.parent


def kind_of(key: str, prefix: str) -> str:
    """``P:{s17}:ca:counter/local-c3`` -> ``{sN}:ca:NAME``; index keys likewise."""
    rest = key[len(prefix) + 1 :]
    rest = re.sub(r"^\{s\d+\}", "{sN}", rest)
    rest = re.sub(r"^\{cm:[^}]+\}", "{cm:P}", rest)
    rest = re.sub(r":(ca|rp|rpt|nt|mb):.*$", r":\1:NAME", rest)
    rest = re.sub(r":gone:.*$", ":gone:ID", rest)
    rest = re.sub(r"^(node|quota):.*$", r"\1:ID", rest)
    return rest


def populate(node: Node, url: str, actors: int) -> None:
    async def counters() -> None:
        caller = Caller("local")
        for i in range(actors):
            name = ActorName("counter", f"local-c{i}")
            for k in range(3):
                await node.router.call(name, "increment", [1], {}, f"r{i}-{k}", caller)

    asyncio.run_coroutine_threadsafe(counters(), node.loop).result(600)
    with httpx.Client(base_url=url, timeout=120) as api:
        for body in (
            {"trigger": {"type": "time_after", "delay_seconds": 3600}},
            {"trigger": {"type": "webhook", "event_type": "payment.completed"}},
        ):
            spec = {**body, "obligation": {"target": "http://127.0.0.1:9/hook"}}
            for _ in range(actors // 100):
                resp = api.post("/v1/commitments/batch", json={"commitments": [spec] * 100})
                resp.raise_for_status()


def measure(redis_url: str, prefix: str) -> dict[str, dict[str, int]]:
    client = redis_client(redis_url)
    kinds: dict[str, dict[str, int]] = defaultdict(lambda: {"keys": 0, "bytes": 0, "entries": 0})
    for raw in client.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode()
        kind = kinds[kind_of(key, prefix)]
        kind["keys"] += 1
        kind["bytes"] += int(client.memory_usage(key, samples=0) or 0)
        kind["entries"] += _entries(client, key)
    client.close()
    return dict(kinds)


def _entries(client: Any, key: str) -> int:
    kind = client.type(key).decode()
    return int(
        {
            "hash": client.hlen,
            "zset": client.zcard,
            "set": client.scard,
            "stream": client.xlen,
            "string": lambda _: 1,
        }[kind](key)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--actors", type=int, default=1000)
    args = ap.parse_args()
    prefix = f"k{uuid.uuid4().hex[:6]}"
    config = parse_config(
        {
            "redis": {"key_prefix": prefix},
            "python_path": [str(ROOT)],
            "types": {"counter": {"class": "examples.helloworld.counter:Counter"}},
            "plugins": {"commitments": {"allow_loopback": True}, "session": {}},
            "runtime": {"max_mailbox": 100000},
        }
    )
    with redis_server() as url:
        node = Node(config, url, "costs")
        node.start()
        server = ServerThread(node).start()
        try:
            populate(node, server.url, args.actors)
            time.sleep(7)  # the index's delayed updates leave the outbox
            kinds = measure(url, prefix)
        finally:
            server.stop()
            node.stop()
    rows = [
        {
            "kind": name,
            "keys": k["keys"],
            "entries": k["entries"],
            "bytes": k["bytes"],
            "bytes_per_key": round(k["bytes"] / k["keys"]),
            "bytes_per_entry": round(k["bytes"] / k["entries"]) if k["entries"] else None,
        }
        for name, k in sorted(kinds.items(), key=lambda kv: -kv[1]["bytes"])
    ]
    version = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True)
    emit(
        {
            "benchmark": "key_costs",
            "machine": machine(),
            "server": version.stdout.strip(),
            "counters": args.actors,
            "commitments_per_trigger_type": args.actors,
            "kinds": rows,
        }
    )


if __name__ == "__main__":
    main()
