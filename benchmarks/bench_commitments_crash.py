"""kill -9 of one of two nodes in the middle of a drain of N commitments due at once.

Two ``troth serve`` nodes share one Redis and the shards; N commitments (default
10,000) fall due in the same second. Once a share of them (``--kill-at``, default
30%) has arrived at the local receiver, one node is killed with SIGKILL. Reports:

* ``lost``: commitments never delivered (must be 0);
* ``repeats``: deliveries of a commitment already received (the attempts that were
  in flight on the killed node), and ``repeats_with_another_key``: those whose
  Idempotency-Key was not their commitment's own (must be 0);
* ``resume_s``: from the kill until the survivor delivered the first commitment of
  the killed node's shards that had not arrived before it; the goal is the lease TTL
  plus 2 s (``goal_s``);
* ``drain_s``: from the due time until the last delivery.

Run:  python benchmarks/bench_commitments_crash.py [--due 10000]
Prints JSON. The receiver and both nodes share this 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

import redis
from bench_commitments import Receiver, create_batches, node_config, spec
from common import emit, machine, redis_server, start_nodes, stop_node

from troth.core.config import Config
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--due", type=int, default=10000)
    ap.add_argument("--kill-at", type=float, default=0.3, help="share delivered at the kill")
    args = ap.parse_args()
    n = args.due
    receiver = Receiver()
    with redis_server() as redis_url, tempfile.TemporaryDirectory() as tmp:
        config = node_config(Path(tmp))
        cfg = Config.model_validate_json(Path(config).read_text())
        keys = KeySpace(cfg.redis.key_prefix, cfg.cluster.shards)
        (survivor, url), (victim, _) = start_nodes(config, redis_url, 2, prefix="k")
        try:
            due = time.time() + n / 1000 + 10  # creation runs at 2,000-3,000/s here
            ids = create_batches(url, spec(receiver.url, timestamp=due), n)
            shard = {
                cid: shard_of(ActorName("commitment", f"local-{cid}"), keys.shard_count)
                for cid in ids
            }
            while len(receiver.arrivals) < n * args.kill_at and time.time() < due + 120:
                time.sleep(0.01)
            client = redis.Redis.from_url(redis_url)
            pipe = client.pipeline(transaction=False)
            for s in range(keys.shard_count):
                pipe.hget(keys.shard(s).lease, "owner")
            owners = [(o or b"").decode() for o in pipe.execute()]
            os.kill(victim.pid, signal.SIGKILL)
            killed = time.time()
            victim.wait()
            before = set(receiver.arrivals)
            while len(receiver.arrivals) < n and time.time() < killed + 180:
                time.sleep(0.1)
        finally:
            stop_node(survivor)
            if victim.poll() is None:
                victim.kill()
    orphans = [c for c in ids if owners[shard[c]] == "k2" and c not in before]
    resumed = min((receiver.arrivals[c] for c in orphans if c in receiver.arrivals), default=None)
    delivered = set(ids) & receiver.arrivals.keys()
    emit(
        {
            "benchmark": "commitments_crash",
            "machine": machine(),
            "nodes": 2,
            "commitments": n,
            "delivered_before_kill": len(before),
            "left_on_killed_node": len(orphans),
            "delivered": len(delivered),
            "lost": n - len(delivered),
            "repeats": receiver.repeats,
            "repeats_with_another_key": receiver.foreign_keys,
            "resume_s": None if resumed is None else round(resumed - killed, 2),
            "goal_s": cfg.cluster.lease_ttl_seconds + 2,
            "drain_s": round(max(receiver.arrivals.values()) - due, 2),
        }
    )


if __name__ == "__main__":
    main()
