"""Work promised far ahead: what it costs a node that claims its shards.

N durable timers due in a day (as a retained commitment's retire timer) and N
outbox entries due in 30 days (as an armed delivery) are written to Redis in their
stored formats; then a node starts over that Redis and claims every shard.

* ``claim_s``: the node's start (it returns once it owns every shard, their due
  work loaded); ``rss_growth_mb``: its resident memory growth; ``timers_in_memory``,
  ``outbox_in_memory``: what its due queues hold (only what falls due within their
  window);
* ``baseline``: in the same run, reading all of that work into due queues without a
  window, as a node did before the window (every timer decoded, every entry's id).

Run:  python benchmarks/bench_far_work.py [--items 200000]
Prints JSON; run it alone on the machine (RSS is of this process).
"""

from __future__ import annotations

import argparse
import gc
import time
import uuid
from typing import Any

import redis
from common import emit, machine, redis_server, rss_bytes

from troth.core import codec
from troth.core.config import parse_config
from troth.core.keys import KeySpace
from troth.core.records import OutboxEntry, TimerRecord
from troth.engine.duequeue import DueQueue
from troth.node import Node

DAY_MS = 86_400_000


def write_far_work(client: redis.Redis, keys: KeySpace, n: int) -> None:
    now = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        sk = keys.shard(i % keys.shard_count)
        actor = f"commitment/local-cm_{uuid.uuid4().hex}"
        timer = TimerRecord(actor, "retire", uuid.uuid4().hex, "retire", [], {}, now + DAY_MS)
        pipe.hset(sk.timer_data, timer.key, timer.encode())
        pipe.zadd(sk.timers, {timer.key: timer.due_ms})
        entry_id = f"{actor}:d"
        spec = {"url": "http://127.0.0.1:9/x"}
        entry = OutboxEntry(entry_id, "webhook", actor, spec, entry_id, {}, next_ms=now)
        pipe.hset(sk.outbox, entry.id, codec.pack(entry.to_dict()))
        pipe.zadd(sk.outbox_queue, {entry.id: now + 30 * DAY_MS})
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def read_all(client: redis.Redis, keys: KeySpace) -> dict[str, Any]:
    """How a node claimed its shards before the window: all of their due work."""
    gc.collect()
    before, started = rss_bytes(), time.perf_counter()
    timers, outbox = DueQueue("timers", lambda _: None), DueQueue("outbox", lambda _: None)
    shards = range(keys.shard_count)
    pipe = client.pipeline(transaction=False)
    for s in shards:
        pipe.hvals(keys.shard(s).timer_data)
        pipe.zrange(keys.shard(s).outbox_queue, 0, -1, withscores=True)
    found = pipe.execute()
    for s in shards:
        for raw in found[2 * s]:
            timer = TimerRecord.decode(raw)
            timers.push(timer.due_ms, s, timer.key, timer)
        for member, score in found[2 * s + 1]:
            outbox.push(int(score), s, member.decode())
    took = time.perf_counter() - started
    gc.collect()
    return {
        "claim_s": round(took, 2),
        "rss_growth_mb": round((rss_bytes() - before) / 2**20),
        "timers_in_memory": len(timers),
        "outbox_in_memory": len(outbox),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=200_000, help="timers, and as many entries")
    args = ap.parse_args()
    prefix = f"f{uuid.uuid4().hex[:8]}"
    config = parse_config({"redis": {"key_prefix": prefix}})
    keys = KeySpace(prefix, config.cluster.shards)
    result: dict[str, Any] = {"benchmark": "far_work", "machine": machine(), "items": args.items}
    with redis_server() as url:
        client = redis.Redis.from_url(url)
        started = time.perf_counter()
        write_far_work(client, keys, args.items)
        result["written_s"] = round(time.perf_counter() - started, 1)
        result["redis_used_mb"] = round(client.info("memory")["used_memory"] / 2**20)
        gc.collect()
        before, started = rss_bytes(), time.perf_counter()
        node = Node(config, url, f"bench-{uuid.uuid4().hex[:4]}")
        try:
            node.start()
            took = time.perf_counter() - started
            gc.collect()
            result.update(
                claim_s=round(took, 2),
                rss_growth_mb=round((rss_bytes() - before) / 2**20),
                shards=len(node.leases.owned),
                timers_in_memory=len(node.scheduler),
                outbox_in_memory=len(node.dispatcher),
            )
        finally:
            node.stop()
        result["baseline"] = read_all(client, keys)
    emit(result)


if __name__ == "__main__":
    main()
