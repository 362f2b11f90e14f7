"""Client-library calls: a session per caller against callers pipelined over one.

N callers (10 and 100), each incrementing its own helloworld counter in a closed
loop for ``--seconds``, through troth's asyncio client library on asyncio's own event
loop, against one `troth serve` node (`ca.json.example`) and its own redis-server
(AOF off), all on this machine:

* ``per_caller``: each caller has a session (a WebSocket) of its own, one call in
  flight on it: the shape of the caf.js comparison (``../shared/peers/cafjs``), where
  each caf.js client library session talks to one CA;
* ``pipelined``: the N callers share one session, their calls in flight together
  on it: the node answers them as they finish, and the calls (and replies) of one
  turn of an event loop travel in one frame (see ``troth.core.frames``).

The shapes alternate within each round (``--rounds``). Each row reports calls/s,
p50/p99 latency and the CPU microseconds a call of the node and of the client (this
process) took. The Redis is troth's benchmark server (``TROTH_REDIS_SERVER`` picks
another). Run: python benchmarks/bench_sessions.py [--seconds 15] [--rounds 1]
Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import cpu_seconds, emit, machine, redis_server, start_node, stop_node

from troth.client import AsyncClient

ROOT = Path(__file__).resolve().parent.parent


async def closed_loop(url: str, callers: int, sessions: int, seconds: float) -> dict[str, Any]:
    """``callers`` callers over ``sessions`` sessions (caller i on session i mod
    sessions), each calling its own counter again as soon as the last call returned."""
    clients = [AsyncClient(url, timeout=60) for _ in range(sessions)]
    await asyncio.gather(*(c.connect() for c in clients))
    tag = f"s{sessions}n{callers}t{time.time_ns()}"
    actors = [clients[i % sessions].actor("counter", f"{tag}-{i}") for i in range(callers)]
    await asyncio.gather(*(a.increment() for a in actors))  # activate every actor
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def caller(actor: Any) -> None:
        while (started := time.perf_counter()) < end:
            await actor.increment()
            latencies.append(time.perf_counter() - started)

    cpu = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(caller(a) for a in actors))
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu
    await asyncio.gather(*(c.close() for c in clients))
    q = statistics.quantiles(latencies, n=100)
    return {
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "client_cpu_us_per_call": round(cpu / len(latencies) * 1e6, 1),
    }


def measure(url: str, pid: int, callers: int, sessions: int, seconds: float) -> dict[str, Any]:
    node_cpu = cpu_seconds([pid])
    row = asyncio.run(closed_loop(url, callers, sessions, seconds))
    row["node_cpu_us_per_call"] = round((cpu_seconds([pid]) - node_cpu) / row["calls"] * 1e6, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=15.0, help="each run's length")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--callers", type=int, nargs="+", default=[10, 100])
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with redis_server() as redis_url:
        proc, url = start_node(str(ROOT / "ca.json.example"), redis_url, "sessions-bench")
        try:
            for rnd in range(1, args.rounds + 1):
                for n in args.callers:
                    for shape, sessions in (("per_caller", n), ("pipelined", 1)):
                        row = measure(url, proc.pid, n, sessions, args.seconds)
                        rows.append({"round": rnd, "callers": n, "shape": shape, **row})
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
        finally:
            stop_node(proc)
    summary = {
        f"{shape}_{n}": statistics.median(
            r["calls_per_s"] for r in rows if r["shape"] == shape and r["callers"] == n
        )
        for n in args.callers
        for shape in ("per_caller", "pipelined")
    }
    emit(
        {
            "benchmark": "sessions",
            "machine": machine(),
            "cpus_used_by": f"node, its redis-server and this client, on {os.cpu_count()} CPUs",
            "calls_per_s_median": summary,
            "pipelined_to_per_caller": {
                str(n): round(summary[f"pipelined_{n}"] / summary[f"per_caller_{n}"], 2)
                for n in args.callers
            },
            "rows": rows,
        }
    )


if __name__ == "__main__":
    main()
