"""troth on one Redis, on a Redis Cluster of 1 master and of 3 masters; and how long
actors are unavailable after a master's process is killed.

For each topology, in the same run on the same machine:

* ``raw_commits_per_s``: the commit script alone through the group-commit batcher,
  1,000 chains of commits (``bench_runtime.bench_raw``): what Redis allows;
* ``commits_per_s``: committed increments of 1,000 counters on one in-process node
  (``bench_runtime.bench_troth``);
* ``calls_per_s``: client-library calls (16 sessions, 100 counters) to
  ``--nodes`` ``troth serve`` processes (``bench_cluster.bench_calls``).

``recovery``: a cluster of 3 masters, each with a replica (cluster-node-timeout
2 s), one troth node and 100 counters called without pause; one master is killed
with SIGKILL. Reported: how long until every counter answers again, and how many
calls failed meanwhile (each retried under its request id, so none is lost).

On a 2-core machine every Redis process, troth node and client shares the same two
cores: expect no speed-up from more masters here. The point is the cost of cluster
routing, and that it works.

Run:  python benchmarks/bench_redis_cluster.py [--server PATH] [--messages 20000]
Prints JSON. ``--server`` picks the redis-server or valkey-server binary (default:
the one ``troth serve`` would start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from bench_cluster import bench_calls
from bench_runtime import bench_raw, bench_troth
from common import emit, machine, redis_server, start_node, stop_node

from troth.edge.embedded_redis import SERVER_ENV, redis_binary
from troth.edge.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
#: How long the recovery scenario watches after the kill.
WINDOW_S = 20.0


@contextlib.contextmanager
def topology(kind: str) -> Iterator[str]:
    if kind == "single":
        with redis_server() as url:
            yield url
    else:
        with LocalCluster(masters=int(kind.split("-")[1])) as cluster:
            yield cluster.url


def throughput(kind: str, messages: int, calls: int, nodes: int, workdir: Path) -> dict[str, Any]:
    with topology(kind) as url:
        raw = bench_raw(url, messages, sequential=False)
        commits = bench_troth(url, 1000, messages, "counter", sequential=False)
        over_http = bench_calls(url, workdir, nodes, calls)
    return {
        "topology": kind,
        "raw_commits_per_s": round(raw),
        "commits_per_s": round(commits),
        "commits_ratio_to_raw": round(commits / raw, 3),
        "calls_per_s": over_http["calls_per_s"],
        "calls_p50_ms": over_http["p50_ms"],
        "calls_p99_ms": over_http["p99_ms"],
        "nodes": nodes,
    }


async def _hammer(url: str, counters: int, stop: asyncio.Event) -> dict[str, Any]:
    """Call every counter in turn, forever; per counter, the times of failed calls."""
    failures: dict[int, list[float]] = {c: [] for c in range(counters)}
    answered: dict[int, float] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def one(c: int) -> None:
            i = 0
            while not stop.is_set():
                body = {"args": [1], "request_id": f"c{c}-{i}"}
                try:
                    resp = await http.post(f"/v1/actors/counter/local-r{c}/increment", json=body)
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok = False
                now = time.monotonic()
                if ok:
                    answered[c] = now
                    i += 1
                else:
                    failures[c].append(now)
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(one(c) for c in range(counters)))
    return {"failures": failures, "answered": answered}


def recovery(workdir: Path, counters: int = 100) -> dict[str, Any]:
    with LocalCluster(masters=3, replicas=1) as cluster:
        config = workdir / "recovery.json"
        config.write_text(
            json.dumps(
                {
                    "redis": {"key_prefix": f"rc{uuid.uuid4().hex[:6]}"},
                    "python_path": [str(ROOT)],
                    "types": {"counter": {"class": "examples.helloworld.counter:Counter"}},
                }
            )
        )
        proc, url = start_node(str(config), cluster.url, "r1")
        try:
            result = asyncio.run(_kill_during(cluster, url, counters))
        finally:
            stop_node(proc)
    return result


async def _kill_during(cluster: LocalCluster, url: str, counters: int) -> dict[str, Any]:
    stop = asyncio.Event()
    task = asyncio.create_task(_hammer(url, counters, stop))
    await asyncio.sleep(3)
    victim = cluster.servers[0].port
    killed = time.monotonic()
    await asyncio.to_thread(cluster.kill, victim)
    promoted = None
    while time.monotonic() - killed < WINDOW_S:
        await asyncio.sleep(0.2)
        if promoted is None and len(await asyncio.to_thread(cluster.master_ports)) == 3:
            promoted = time.monotonic() - killed
    stop.set()
    seen = await task
    after = {c: [t for t in times if t >= killed] for c, times in seen["failures"].items()}
    last_failure = max((t for times in after.values() for t in times), default=killed)
    return {
        "masters": cluster.masters,
        "replicas_per_master": cluster.replicas,
        "cluster_node_timeout_ms": cluster.node_timeout_ms,
        "counters": counters,
        "replica_promoted_after_s": None if promoted is None else round(promoted, 2),
        "counters_interrupted": sum(1 for times in after.values() if times),
        "failed_calls_retried": sum(len(times) for times in after.values()),
        "unavailable_s": round(last_failure - killed, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--server", help="redis-server or valkey-server binary")
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--nodes", type=int, default=2, help="troth nodes for the calls")
    ap.add_argument("--topologies", default="single,cluster-1,cluster-3")
    args = ap.parse_args()
    if args.server:
        os.environ[SERVER_ENV] = args.server
    binary = redis_binary()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [
            throughput(kind, args.messages, args.calls, args.nodes, work)
            for kind in args.topologies.split(",")
        ]
        rec = recovery(work)
    base = rows[0]
    for row in rows:
        row["commits_ratio_to_first"] = round(row["commits_per_s"] / base["commits_per_s"], 3)
        row["calls_ratio_to_first"] = round(row["calls_per_s"] / base["calls_per_s"], 3)
    emit(
        {
            "benchmark": "redis_cluster",
            "machine": machine(),
            "server": version.strip(),
            "results": rows,
            "recovery_after_master_kill": rec,
        }
    )


if __name__ == "__main__":
    main()
