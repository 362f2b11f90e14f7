"""Client-library throughput and latency on 1 and 3 nodes, and recovery after kill -9.

* ``calls``: N concurrent client sessions (each on a random node) call 100 counters
  through the WebSocket client; calls/s and p50/p99 latency, for 1 and 3 nodes.
  With 3 nodes about two calls in three are forwarded to the owner.
* ``recovery``: 10,000 autonomous actors active on 2 nodes; one node is killed with
  SIGKILL; we measure the time to the first successful call on an actor that lived
  there, and the time until every actor that lived there has pulsed again.

Run:  python benchmarks/bench_cluster.py [--calls 5000] [--actors 10000]
Prints JSON. Node processes are real `troth serve` subprocesses on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from common import emit, machine, redis_server, start_node, stop_node

from troth.client import AsyncClient
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of
from troth.core.redis_clients import redis_client

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 1024


class Cluster:
    def __init__(self, redis_url: str, workdir: Path, ttl: float = 5.0) -> None:
        self.redis_url = redis_url
        self.prefix = f"bench{uuid.uuid4().hex[:6]}"
        self.config = workdir / f"{self.prefix}.json"
        self.config.write_text(
            json.dumps(
                {
                    "redis": {"key_prefix": self.prefix},
                    "cluster": {"shards": SHARDS, "lease_ttl_seconds": ttl, "heartbeat_seconds": 1},
                    "python_path": [str(ROOT)],
                    "types": {
                        "counter": {"class": "examples.helloworld.counter:Counter"},
                        "heartbeat": {
                            "class": "examples.autonomous.heartbeat:Heartbeat",
                            "pulse_seconds": 10,
                            "idle_seconds": 3600,
                        },
                    },
                    "runtime": {"max_mailbox": 100000},
                }
            )
        )
        self.procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}

    def start(self, node_id: str) -> str:
        proc, url = start_node(str(self.config), self.redis_url, node_id)
        self.procs[node_id] = (proc, url)
        return url

    def balanced(self, n: int) -> None:
        client = redis_client(self.redis_url)
        keys = KeySpace(self.prefix, SHARDS)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            owners = [client.hget(keys.shard(s).lease, "owner") for s in range(SHARDS)]
            counts = {o: owners.count(o) for o in set(owners)}
            fair = max(counts.values()) <= -(-SHARDS // n)
            if len(counts) == n and b"" not in counts and None not in counts and fair:
                client.close()
                return
            time.sleep(0.5)
        raise RuntimeError("cluster did not balance")

    def kill(self, node_id: str) -> None:
        proc, _ = self.procs.pop(node_id)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            stop_node(proc)
        self.procs.clear()

    @property
    def urls(self) -> list[str]:
        return [url for _, url in self.procs.values()]


async def drive(urls: list[str], calls: int, sessions: int, actors: int) -> dict[str, Any]:
    clients = [AsyncClient(random.sample(urls, len(urls))) for _ in range(sessions)]
    for c in clients:
        await c.connect()
    latencies: list[float] = []
    per = calls // sessions

    async def worker(c: AsyncClient, w: int) -> None:
        for i in range(per):
            t = time.perf_counter()
            await c.call(f"counter/bench-{(w * per + i) % actors}", "increment")
            latencies.append(time.perf_counter() - t)

    for c in clients:  # warm up: activate every actor
        await asyncio.gather(*(c.call(f"counter/bench-{a}", "get") for a in range(actors)))
        break
    started = time.perf_counter()
    await asyncio.gather(*(worker(c, w) for w, c in enumerate(clients)))
    elapsed = time.perf_counter() - started
    for c in clients:
        await c.close()
    q = statistics.quantiles(latencies, n=100)
    return {
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
    }


def bench_calls(redis_url: str, workdir: Path, nodes: int, calls: int) -> dict[str, Any]:
    cluster = Cluster(redis_url, workdir)
    try:
        for i in range(nodes):
            cluster.start(f"n{i}")
        cluster.balanced(nodes)
        result = asyncio.run(drive(cluster.urls, calls, sessions=16, actors=100))
    finally:
        cluster.stop()
    return {"nodes": nodes, "actors": 100, "sessions": 16, **result}


def bench_recovery(redis_url: str, workdir: Path, actors: int) -> dict[str, Any]:
    cluster = Cluster(redis_url, workdir)
    client = redis_client(redis_url)
    keys = KeySpace(cluster.prefix, SHARDS)
    try:
        cluster.start("r0")
        cluster.start("r1")
        cluster.balanced(2)
        names = [ActorName("heartbeat", f"bench-{i}") for i in range(actors)]

        async def wake() -> None:
            c = AsyncClient(cluster.urls, timeout=120)
            await c.connect()
            sem = asyncio.Semaphore(200)

            async def one(n: ActorName) -> None:
                async with sem:
                    await c.call(str(n), "wake")

            await asyncio.gather(*(one(n) for n in names))
            await c.close()

        t = time.perf_counter()
        asyncio.run(wake())
        activation_s = time.perf_counter() - t
        victim = [
            n for n in names if client.hget(keys.shard(shard_of(n, SHARDS)).lease, "owner") == b"r0"
        ]

        def seqs() -> list[int]:
            pipe = client.pipeline(transaction=False)
            for n in victim:
                pipe.hget(keys.shard(shard_of(n, SHARDS)).checkpoint(str(n)), "seq")
            return [int(v or 0) for v in pipe.execute()]

        survivor_url = cluster.procs["r1"][1]
        before = seqs()
        killed = time.monotonic()
        cluster.kill("r0")
        first_call = None
        probe = victim[0]
        while first_call is None:
            try:
                r = httpx.post(f"{survivor_url}/v1/actors/{probe}/status", timeout=30)
                if r.status_code == 200:
                    first_call = time.monotonic() - killed
            except httpx.HTTPError:
                time.sleep(0.05)
        all_pulsing = None
        while all_pulsing is None and time.monotonic() - killed < 300:
            now = seqs()
            if all(a > b for a, b in zip(now, before, strict=True)):
                all_pulsing = time.monotonic() - killed
            else:
                time.sleep(0.25)
    finally:
        cluster.stop()
        client.close()
    return {
        "active_actors": actors,
        "nodes": 2,
        "moved_actors": len(victim),
        "lease_ttl_seconds": 5.0,
        "pulse_seconds": 10,
        "activation_seconds": round(activation_s, 1),
        "kill_to_first_call_s": round(first_call, 2),
        "kill_to_all_pulsing_s": round(all_pulsing, 2) if all_pulsing else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--actors", type=int, default=10000)
    ap.add_argument("--recovery-only", action="store_true", help="skip the calls part")
    args = ap.parse_args()
    out: dict[str, Any] = {"benchmark": "cluster", "machine": machine()}
    with redis_server() as url, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.recovery_only:
            calls = [bench_calls(url, workdir, n, args.calls) for n in (1, 3)]
            out["calls"] = calls
            out["ratio_3_to_1_nodes"] = round(calls[1]["calls_per_s"] / calls[0]["calls_per_s"], 3)
        out["recovery"] = bench_recovery(url, workdir, args.actors)
    emit(out)


if __name__ == "__main__":
    main()
