"""A commitment's whole life on one node: created, delivered, retired.

Benchmarks of creation and firing leave out what a commitment costs a day later,
when its retention ends and it is deleted with every key it owns. A service that
keeps up with N commitments a second must also retire N a second. This runs N
time-only commitments through all three phases on one `troth serve` node (retention
shortened to ``--retention`` seconds) and reports, per phase:

* ``node_cpu_us``: the node's CPU time per commitment (steadier than rates on a
  shared machine), and ``redis_cpu_us``: Redis's;
* ``per_s``: commitments per second through the phase (for the retirement at most
  the delivery's: each is due ``--retention`` after its own delivery);
* ``redis_bytes``: Redis memory per commitment after the phase (growth over the
  empty database): pending, finished and retained, retired (what remains then is
  the tombstones that let a GET say "retired", until they expire).

``ratio_to_delivery``: each phase's node CPU over the delivery's, measured in the
same run: what share of a commitment's life each phase takes.

Run:  python benchmarks/bench_lifecycle.py [--n 8000] [--retention 20]
Prints JSON. The receiver and the node share this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from bench_commitments import Receiver, create_batches, spec
from common import cpu_seconds, emit, machine, redis_server, start_nodes, stop_node


def node_config(workdir: Path, retention: float) -> str:
    cfg = workdir / "node.json"
    commitments = {"allow_loopback": True, "retention_seconds": retention}
    cfg.write_text(
        json.dumps(
            {
                "redis": {"key_prefix": "lbench"},
                "runtime": {"outbox_workers": 64, "max_mailbox": 100000},
                "plugins": {"commitments": commitments, "timers": {}, "send": {}},
            }
        )
    )
    return str(cfg)


def retained(client: redis.Redis, ended: list[bytes]) -> int:
    """Finished commitments not retired yet (in the index's ``ended`` sets)."""
    return sum(int(client.zcard(key)) for key in ended)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8000, help="commitments (a multiple of 100)")
    ap.add_argument("--retention", type=float, default=20.0, help="seconds (>= 5)")
    args = ap.parse_args()
    if args.n < 100 or args.n % 100 or args.retention < 5:
        ap.error("--n: a multiple of 100; --retention >= 5")
    n = args.n
    receiver = Receiver()
    with redis_server() as redis_url, tempfile.TemporaryDirectory() as tmp:
        client = redis.Redis.from_url(redis_url)
        redis_pid = int(client.info("server")["process_id"])
        ((proc, url),) = start_nodes(
            node_config(Path(tmp), args.retention), redis_url, 1, prefix="l"
        )
        empty = int(client.info("memory")["used_memory"])
        phases: dict[str, dict[str, Any]] = {}

        def measure(phase: str, started: float, cpu: tuple[float, float]) -> None:
            wall = time.time() - started
            node, rds = cpu_seconds([proc.pid]) - cpu[0], cpu_seconds([redis_pid]) - cpu[1]
            phases[phase] = {
                "per_s": round(n / wall),
                "node_cpu_us": round(node / n * 1e6),
                "redis_cpu_us": round(rds / n * 1e6),
                "redis_bytes": round((int(client.info("memory")["used_memory"]) - empty) / n),
            }

        def cpu() -> tuple[float, float]:
            return cpu_seconds([proc.pid]), cpu_seconds([redis_pid])

        try:
            # all due together, late enough that every creation is done by then
            due = time.time() + 5 + n / 1000
            started, before = time.time(), cpu()
            create_batches(url, spec(receiver.url, timestamp=due), n)
            measure("create", started, before)
            time.sleep(max(0.0, due - time.time() - 0.5))
            started, before = time.time(), cpu()
            while len(receiver.arrivals) < n and time.time() < due + 600:
                time.sleep(0.02)
            measure("deliver", min(started, due), before)
            ended = max(receiver.arrivals.values())
            ended_sets = list(client.scan_iter(match="*:ended"))  # not while measuring
            # the first retirement is due `retention` after the first delivery ended
            time.sleep(max(0.0, min(receiver.arrivals.values()) + args.retention - time.time()))
            started, before = time.time(), cpu()
            while retained(client, ended_sets) and time.time() < ended + args.retention + 600:
                time.sleep(0.05)
            measure("retire", started, before)
        finally:
            stop_node(proc)
    delivery = phases["deliver"]["node_cpu_us"]
    emit(
        {
            "benchmark": "lifecycle",
            "machine": machine(),
            "commitments": n,
            "retention_seconds": args.retention,
            "delivered": len(receiver.arrivals),
            "repeats": receiver.repeats,
            "phases": phases,
            "ratio_to_delivery": {
                p: round(v["node_cpu_us"] / max(delivery, 1), 2) for p, v in phases.items()
            },
        }
    )


if __name__ == "__main__":
    main()
