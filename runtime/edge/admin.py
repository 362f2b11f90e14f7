"""Operator reads straight from Redis: ``troth status`` and ``troth inspect``.

They need no running node, so they work while a cluster is down or recovering.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import redis

from troth.core import codec
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of
from troth.core.records import OutboxEntry
from troth.extension import Extension


def status(
    client: redis.Redis, keys: KeySpace, extensions: Sequence[Extension] = ()
) -> dict[str, Any]:
    """The deployment at a glance; each extension adds its section under its name."""
    now = int(time.time() * 1000)
    nodes_raw = client.zrange(keys.nodes, 0, -1, withscores=True)
    pipe = client.pipeline(transaction=False)
    for member, _ in nodes_raw:
        pipe.hgetall(keys.node(member.decode()))
    infos = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for s in range(keys.shard_count):
        sk = keys.shard(s)
        pipe.hget(sk.lease, "owner")
        pipe.zcard(sk.outbox_queue)
        pipe.hlen(sk.outbox)
        pipe.zcard(sk.timers)
        pipe.scard(sk.actors)
    rows = pipe.execute()
    served_by = {
        member.decode(): _Bitmap(info.get(b"served", b""))
        for (member, expiry), info in zip(nodes_raw, infos, strict=True)
        if expiry > now
    }
    owners: Counter[str] = Counter()
    outbox_pending = outbox_total = timers = actors = served = 0
    stuck_shards = []
    for i in range(keys.shard_count):
        owner, queued, total, tm, cas = rows[i * 5 : i * 5 + 5]
        owner_id = (owner or b"").decode()
        owners[owner_id or "(none)"] += 1
        if owner_id in served_by and served_by[owner_id].get(i):
            served += 1
        outbox_pending += queued
        outbox_total += total
        timers += tm
        actors += cas
        if total > queued:
            stuck_shards.append(i)
    nodes = []
    for (member, expiry), info in zip(nodes_raw, infos, strict=True):
        node_id = member.decode()
        decoded = {k.decode(): v.decode() for k, v in info.items()}
        nodes.append(
            {
                "id": node_id,
                "live": expiry > now,
                "url": decoded.get("url", ""),
                "pid": decoded.get("pid", ""),
                "shards": owners.get(node_id, 0),
                "active_actors": int(decoded.get("active", 0) or 0),
                "lease_expires_in_seconds": round((expiry - now) / 1000, 1),
            }
        )
    return {
        "prefix": keys.prefix,
        "shards": keys.shard_count,
        "unserved_shards": keys.shard_count - served,
        "nodes": nodes,
        "actors": actors,
        "outbox": {"pending": outbox_pending, "stuck": outbox_total - outbox_pending},
        "timers": timers,
        "recent_failures": recent_failures(client, keys, stuck_shards),
    } | _extension_sections(client, keys, extensions)


def _extension_sections(
    client: redis.Redis, keys: KeySpace, extensions: Sequence[Extension]
) -> dict[str, Any]:
    sections = {ext.name: ext.status(client, keys) for ext in extensions if ext.name}
    return {name: section for name, section in sections.items() if section is not None}


class _Bitmap:
    """A node's published ``served`` bitmap (hex), read bit by bit."""

    def __init__(self, raw: bytes) -> None:
        try:
            self.bits = bytes.fromhex(raw.decode())
        except ValueError:
            self.bits = b""

    def get(self, shard: int) -> bool:
        byte = shard // 8
        return byte < len(self.bits) and bool(self.bits[byte] >> (shard % 8) & 1)


def recent_failures(
    client: redis.Redis, keys: KeySpace, shards: list[int], limit: int = 20
) -> list[dict[str, Any]]:
    """The latest dead or uncertain side effects (the ledger keeps them for operators)."""
    pipe = client.pipeline(transaction=False)
    for s in shards:
        pipe.hvals(keys.shard(s).outbox)
    failed = []
    for values in pipe.execute() if shards else []:
        for raw in values:
            e = OutboxEntry.from_dict(codec.unpack(raw))
            if e.status in ("dead", "uncertain"):
                last = e.history[-1] if e.history else {}
                failed.append(
                    {
                        "id": e.id,
                        "kind": e.kind,
                        "origin": e.origin,
                        "status": e.status,
                        "attempts": e.attempts,
                        "at_ms": last.get("at_ms", e.created_ms),
                        "error": (e.result or {}).get("error") or last.get("error"),
                    }
                )
    failed.sort(key=lambda f: f["at_ms"], reverse=True)
    return failed[:limit]


def inspect(client: redis.Redis, keys: KeySpace, name: ActorName) -> dict[str, Any] | None:
    shard = shard_of(name, keys.shard_count)
    sk = keys.shard(shard)
    fields = client.hgetall(sk.checkpoint(str(name)))
    if not fields:
        return None
    f = {k.decode(): v for k, v in fields.items()}
    pstate = codec.unpack(f["pstate"]) if f.get("pstate") else {}
    lease = client.hgetall(sk.lease)
    entries = []
    for _, raw in client.hscan_iter(sk.outbox, match=f"{name}:*", count=500):
        e = OutboxEntry.from_dict(codec.unpack(raw))
        entries.append(
            {
                "id": e.id,
                "kind": e.kind,
                "status": e.status,
                "attempts": e.attempts,
                "next_ms": e.next_ms,
                "idempotency_key": e.idempotency_key,
                "spec": e.spec,
                "result": e.result,
            }
        )
    return {
        "name": str(name),
        "shard": shard,
        "owner": (lease.get(b"owner") or b"").decode(),
        "epoch": int(lease.get(b"epoch") or 0),
        "version": f["version"].decode(),
        "seq": int(f["seq"]),
        "created_ms": int(f.get("created", 0) or 0),
        "updated_ms": int(f.get("updated", 0) or 0),
        "state": codec.unpack(f["state"]),
        "timers": pstate.get("timers", {}),
        "outbox": sorted(entries, key=lambda e: e["id"]),
        "cached_replies": client.zcard(sk.reply_times(str(name))),
    }
