"""Commitment throughput and firing lateness on `troth serve` (one node, or
``--nodes N`` sharing one Redis; requests go to the first, which forwards).

* ``create``: commitments created per second, one per request (8 concurrent
  clients) and in batches of 100 (4 concurrent clients), with the nodes' CPU time
  per creation (steadier than rates on a shared machine); ``--rounds N`` measures
  both N times and reports the medians;
* ``due_together``: N commitments due in the same second (default 10,000): firing
  lateness p50/p99/max measured at a local receiver (arrival - due time), the
  drain time until the last one arrived, and Redis memory per pending commitment
  (``used_memory`` growth over the creation / N), and the nodes' CPU time per
  delivery from just before the due time (firing, delivery, index). The outbox
  runs 64 attempts at once;
* ``fanout``: N commitments waiting for one event type (default 10,000); one event
  fires them all: how long the publish took and until the last delivery arrived.

Run:  python benchmarks/bench_commitments.py [--due 10000] [--nodes 2]
Prints JSON. The receiver and the node share this 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import redis
from aiohttp import web
from common import cpu_seconds, emit, machine, redis_server, start_nodes, stop_node

ROOT = Path(__file__).resolve().parent.parent


class Receiver:
    """aiohttp on a loop of its own thread (the peers' receiver is aiohttp too), so the
    receiver is not what limits the drain."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}  # Idempotency-Key -> first arrival
        self.repeats = 0  # deliveries of a key already received
        self.foreign_keys = 0  # repeats whose key is not their commitment's id
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.url = ""

        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            key = request.headers["idempotency-key"]
            if key in self.arrivals:
                self.repeats += 1
                self.foreign_keys += json.loads(body)["commitment_id"] != key
            else:
                self.arrivals[key] = time.time()
            return web.Response(text="ok")

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/{tail:.*}", hook)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            started.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(serve())
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        started.wait(10)


def node_config(workdir: Path) -> str:
    cfg = workdir / "node.json"
    cfg.write_text(
        json.dumps(
            {
                "redis": {"key_prefix": "cbench"},
                "runtime": {"outbox_workers": 64, "max_mailbox": 100000},
                "plugins": {"commitments": {"allow_loopback": True}, "timers": {}, "send": {}},
            }
        )
    )
    return str(cfg)


def spec(target: str, **trigger: Any) -> dict[str, Any]:
    return {"trigger": {"type": "time_after", **trigger}, "obligation": {"target": target}}


def bench_create(
    url: str, target: str, single: int, batches: int, pids: list[int], rounds: int = 1
) -> dict[str, Any]:
    """8 concurrent clients (tasks of one aiohttp client, so the load generator is not
    what limits the rate), one commitment per request; then batches of 100, 4 at once.
    With ``rounds``, both phases are run that many times, one after the other, and
    the medians reported (each round's figures beside them): a phase lasts a second
    or so, and this machine's speed drifts by a third within minutes."""
    body = spec(target, delay_seconds=3600)

    async def run() -> list[tuple[float, float, float, float]]:
        async with aiohttp.ClientSession(url) as api:

            async def post(path: str, payload: Any, n: int) -> None:
                for _ in range(n):
                    async with api.post(path, json=payload) as resp:
                        assert resp.status in (200, 201), await resp.text()
                        await resp.read()

            async def timed(
                path: str, payload: Any, clients: int, each: int, per_request: int
            ) -> tuple[float, float]:
                """Creations a second, and node CPU seconds a creation."""
                made = clients * each * per_request
                t, cpu = time.perf_counter(), cpu_seconds(pids)
                await asyncio.gather(*(post(path, payload, each) for _ in range(clients)))
                return made / (time.perf_counter() - t), (cpu_seconds(pids) - cpu) / made

            await post("/v1/commitments", body, 50)  # warm up
            batch = {"commitments": [body] * 100}
            return [
                (
                    *await timed("/v1/commitments", body, 8, single // 8, 1),
                    *await timed("/v1/commitments/batch", batch, 4, batches // 4, 100),
                )
                for _ in range(rounds)
            ]

    measured = asyncio.run(run())
    single_rate, single_cpu, batch_rate, batch_cpu = ([m[i] for m in measured] for i in range(4))
    return {
        "single_per_s": round(statistics.median(single_rate)),
        "batch_per_s": round(statistics.median(batch_rate)),
        # steadier than the rates on a shared machine
        "node_cpu_us_per_single": round(statistics.median(single_cpu) * 1e6),
        "node_cpu_us_per_batched": round(statistics.median(batch_cpu) * 1e6),
        "rounds": [
            {
                "single_per_s": round(m[0]),
                "batch_per_s": round(m[2]),
                "node_cpu_us_per_single": round(m[1] * 1e6),
                "node_cpu_us_per_batched": round(m[3] * 1e6),
            }
            for m in measured
        ],
    }


def create_batches(url: str, body: dict[str, Any], n: int) -> list[str]:
    """``n`` commitments like ``body``, in batches of 100 (4 requests at once)."""
    with httpx.Client(base_url=url, timeout=120) as api:

        def one(_: int) -> list[str]:
            resp = api.post("/v1/commitments/batch", json={"commitments": [body] * 100})
            resp.raise_for_status()
            return [c["id"] for c in resp.json()["commitments"]]

        with ThreadPoolExecutor(4) as pool:
            return [cid for ids in pool.map(one, range(n // 100)) for cid in ids]


def bench_due(
    url: str, redis_url: str, receiver: Receiver, n: int, batch_rate: float, pids: list[int]
) -> dict[str, Any]:
    # Creation slows as active actors (threads) accumulate: leave a wide margin.
    due = time.time() + n / max(batch_rate, 1) * 3 + 10
    body = spec(receiver.url, timestamp=due)
    rclient = redis.Redis.from_url(redis_url)
    before = int(rclient.info("memory")["used_memory"])
    create_batches(url, body, n)
    created_by = time.time()
    time.sleep(2)  # the index updates of the creations leave the outbox after a second
    per_pending = (int(rclient.info("memory")["used_memory"]) - before) / n
    # the CPU count starts just before the due time, so it leaves out the wait (and
    # the passivation of the idle commitments meanwhile): firing and delivery only
    time.sleep(max(0.0, due - 0.5 - time.time()))
    cpu = cpu_seconds(pids)
    while len(receiver.arrivals) < n and time.time() < due + 600:
        time.sleep(0.2)
    cpu = cpu_seconds(pids) - cpu
    late = sorted(a - due for a in receiver.arrivals.values())
    q = statistics.quantiles(late, n=100) if len(late) > 1 else [0.0] * 99
    return {
        "commitments": n,
        "delivered": len(late),
        "created_before_due_s": round(due - created_by, 1),
        "redis_bytes_per_pending": round(per_pending),
        "lateness_p50_s": round(q[49], 2),
        "lateness_p99_s": round(q[98], 2),
        "lateness_max_s": round(late[-1], 2) if late else None,
        "drain_s": round(late[-1] - max(0.0, late[0]), 2) if late else None,
        # from the due time until the last arrival, as the peers' harness counts it
        "deliveries_per_s": round(len(late) / late[-1]) if late and late[-1] > 0 else None,
        "repeats": receiver.repeats,
        "node_cpu_us_per_delivery": round(cpu / max(len(late), 1) * 1e6),
    }


def bench_fanout(url: str, receiver: Receiver, n: int) -> dict[str, Any]:
    """``n`` commitments waiting for one event type; one event fires them all."""
    receiver.arrivals.clear()
    repeats = receiver.repeats
    body = {
        "trigger": {"type": "webhook", "event_type": "go"},
        "obligation": {"target": receiver.url},
    }
    ids = set(create_batches(url, body, n))
    started = time.time()
    with httpx.Client(base_url=url, timeout=60) as api:
        resp = api.post("/v1/events", json={"event_type": "go", "payload": {}})
        resp.raise_for_status()
    published = time.time() - started
    while len(receiver.arrivals) < n and time.time() < started + 600:
        time.sleep(0.1)
    return {
        "commitments": n,
        "delivered": len(ids & receiver.arrivals.keys()),
        "repeats": receiver.repeats - repeats,
        "publish_s": round(published, 3),
        "all_delivered_s": round(max(receiver.arrivals.values()) - started, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--single", type=int, default=500)
    ap.add_argument("--batches", type=int, default=100, help="requests of 100 creations")
    ap.add_argument("--due", type=int, default=10000)
    ap.add_argument("--fanout", type=int, default=10000, help="0 skips the fan-out")
    ap.add_argument("--nodes", type=int, default=1, help="nodes sharing one Redis")
    ap.add_argument("--rounds", type=int, default=1, help="creation phases; medians reported")
    args = ap.parse_args()
    if args.single < 8 or args.batches < 4 or args.due < 1 or args.fanout < 0 or args.rounds < 1:
        ap.error(
            "--single >= 8, --batches >= 4, --due >= 1, --fanout >= 0 (0 skips it), --rounds >= 1"
        )
    receiver = Receiver()
    with redis_server() as redis_url, tempfile.TemporaryDirectory() as tmp:
        nodes = start_nodes(node_config(Path(tmp)), redis_url, args.nodes, prefix="c")
        url = nodes[0][1]  # the first node takes every request, and forwards
        try:
            pids = [proc.pid for proc, _ in nodes]
            create = bench_create(url, receiver.url, args.single, args.batches, pids, args.rounds)
            due = bench_due(url, redis_url, receiver, args.due, create["batch_per_s"], pids)
            fanout = bench_fanout(url, receiver, args.fanout) if args.fanout else None
        finally:
            for proc, _ in nodes:
                stop_node(proc)
    emit(
        {
            "benchmark": "commitments",
            "machine": machine(),
            "nodes": args.nodes,
            "create": create,
            "due_together": due,
            "fanout": fanout,
        }
    )


if __name__ == "__main__":
    main()
