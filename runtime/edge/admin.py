"""What operators read and change, straight in Redis: ``troth status``, ``inspect``,
``actors``, ``outbox`` and ``drain``, and the console's ``/v1/admin`` API.

They need no running node, so they work while a cluster is down or recovering.
Changes are made so that a live node is never contradicted: an outbox entry is
re-driven or purged only while it is still the dead or uncertain record the
operator read (compare-and-set, ``lua/ledger_cas.lua``), and the shard's owner
is told through its inbox (it takes the entry up within a heartbeat); a drain is a
flag the node itself acts on (:mod:`troth.cluster.leases`). Deleting an actor is
not done here: it must be the actor's own last transaction, on the node that owns
it (``troth delete`` goes through a node).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import redis

from troth.core import codec
from troth.core.errors import AppError, BadRequestError, NotFoundError, TrothError
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of
from troth.core.records import OutboxEntry
from troth.core.scripts import Script, load_lua
from troth.extension import Extension

#: The outbox entries an operator acts on: attempts exhausted, or outcome unknown.
FAILED = ("dead", "uncertain")
#: Most entries or actors one listing returns.
MAX_LIST = 1000
_LEDGER_CAS = Script(load_lua("ledger_cas.lua"))


def status(
    client: redis.Redis, keys: KeySpace, extensions: Sequence[Extension] = ()
) -> dict[str, Any]:
    """The deployment at a glance; each extension adds its section under its name."""
    now = int(time.time() * 1000)
    nodes_raw = client.zrange(keys.nodes, 0, -1, withscores=True)
    pipe = client.pipeline(transaction=False)
    for member, _ in nodes_raw:
        pipe.hgetall(keys.node(member.decode()))
    pipe.smembers(keys.draining)
    *infos, draining_raw = pipe.execute()
    draining = {n.decode() for n in draining_raw}
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
                "cpu": int(decoded["cpu"]) if decoded.get("cpu") else None,  # runtime.cpu
                "shards": owners.get(node_id, 0),
                "active_actors": int(decoded.get("active", 0) or 0),
                "lease_expires_in_seconds": round((expiry - now) / 1000, 1),
                "draining": node_id in draining,
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
        "recent_failures": failed_entries(client, keys, stuck_shards, limit=20),
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


def shard_table(client: redis.Redis, keys: KeySpace) -> list[dict[str, Any]]:
    """Every shard's lease: its owner ("" when free) and fencing epoch."""
    pipe = client.pipeline(transaction=False)
    for s in range(keys.shard_count):
        pipe.hmget(keys.shard(s).lease, ["owner", "epoch"])
    return [
        {"shard": s, "owner": (owner or b"").decode(), "epoch": int(epoch or 0)}
        for s, (owner, epoch) in enumerate(pipe.execute())
    ]


def failed_entries(
    client: redis.Redis,
    keys: KeySpace,
    shards: Sequence[int] | None = None,
    actor: ActorName | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The latest dead or uncertain outbox entries (the ledger keeps them for
    operators), newest first: of one ``actor``, of ``shards``, or of every shard
    that has any (one pipelined round trip finds them)."""
    if actor is not None:
        shards = [shard_of(actor, keys.shard_count)]
    elif shards is None:
        pipe = client.pipeline(transaction=False)
        for s in range(keys.shard_count):
            pipe.hlen(keys.shard(s).outbox)
            pipe.zcard(keys.shard(s).outbox_queue)
        sizes = pipe.execute()
        shards = [s for s in range(keys.shard_count) if sizes[2 * s] > sizes[2 * s + 1]]
    pipe = client.pipeline(transaction=False)
    for s in shards:
        pipe.hgetall(keys.shard(s).outbox)
    failed = []
    for shard, entries in zip(shards, pipe.execute() if shards else [], strict=True):
        for entry_id, raw in entries.items():
            e = OutboxEntry.load(entry_id, raw)
            if e.status in FAILED and (actor is None or e.origin == str(actor)):
                failed.append(_entry_row(e, shard))
    failed.sort(key=lambda f: f["at_ms"], reverse=True)
    return failed[: min(limit, MAX_LIST)]


def _entry_row(e: OutboxEntry, shard: int) -> dict[str, Any]:
    last = e.history[-1] if e.history else {}
    return {
        "id": e.id,
        "shard": shard,
        "kind": e.kind,
        "origin": e.origin,
        "status": e.status,
        "attempts": e.attempts,
        "at_ms": last.get("at_ms", e.created_ms),
        "error": (e.result or {}).get("error") or last.get("error"),
        "idempotency_key": e.idempotency_key,
        "spec": e.spec,
        "history": e.history,
    }


def find_entry(client: redis.Redis, keys: KeySpace, entry_id: str) -> tuple[int, bytes]:
    """The shard and stored bytes of an outbox entry. Its id starts with its origin's
    name (``TYPE/ID:...``), which names the shard; an id may itself hold ``:``, so
    each split is tried."""
    if len(entry_id) > 400:
        raise BadRequestError("an outbox entry id has at most 400 characters")
    parts = entry_id.split(":")
    for i in range(len(parts) - 1, 0, -1):
        try:
            origin = ActorName.parse(":".join(parts[:i]))
        except TrothError:
            continue
        shard = shard_of(origin, keys.shard_count)
        raw = client.hget(keys.shard(shard).outbox, entry_id)
        if raw is not None:
            return shard, raw
    raise NotFoundError(f"no outbox entry {entry_id!r}")


def redrive(client: redis.Redis, keys: KeySpace, entry_id: str) -> dict[str, Any]:
    """Attempt a dead or uncertain entry again, from its first attempt, with the same
    idempotency key (the receiver can still tell a repeat). Its history is kept."""
    return _change_failed(client, keys, entry_id, purge=False)


def purge(client: redis.Redis, keys: KeySpace, entry_id: str) -> dict[str, Any]:
    """Forget a dead or uncertain entry: the operator has dealt with it."""
    return _change_failed(client, keys, entry_id, purge=True)


def _change_failed(
    client: redis.Redis, keys: KeySpace, entry_id: str, purge: bool
) -> dict[str, Any]:
    shard, raw = find_entry(client, keys, entry_id)
    entry = OutboxEntry.load(entry_id, raw)
    if entry.status not in FAILED:
        raise AppError(
            f"outbox entry {entry_id!r} is {entry.status}; only dead or uncertain entries "
            "are re-driven or purged",
            {"status": entry.status},
        )
    sk = keys.shard(shard)
    now = int(time.time() * 1000)
    if purge:
        new, due = b"", ""
    else:
        entry.status, entry.attempts, entry.next_ms, entry.result = "pending", 0, now, None
        new, due = codec.pack(entry.to_dict()), str(now)
    (done,) = _LEDGER_CAS.run_many(
        client, [([sk.outbox, sk.outbox_queue], [entry_id, raw, new, due])]
    )
    if not done:
        raise AppError(f"outbox entry {entry_id!r} changed meanwhile; read it again")
    if not purge:
        owner = (client.hget(sk.lease, "owner") or b"").decode()
        if owner:  # else whoever claims the shard loads it from the queue
            command = {"op": "redrive", "shard": shard, "entry": entry_id}
            client.rpush(keys.inbox(owner), json.dumps(command))
    return {"id": entry_id, "shard": shard, "status": "purged" if purge else "pending"}


def list_actors(
    client: redis.Redis,
    keys: KeySpace,
    actor_type: str | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> tuple[list[str], str | None]:
    """Actor names with a checkpoint, of one type or all, shard by shard; about
    ``limit`` a page (a shard's scan step is never split). ``cursor``: the
    ``next_cursor`` of the previous page (``SHARD:SCAN``)."""
    shard, pos = 0, 0
    if cursor:
        head, _, tail = cursor.partition(":")
        if not (head.isdigit() and tail.isdigit()):
            raise BadRequestError("cursor must be SHARD:POSITION, as a listing returned it")
        shard, pos = int(head), int(tail)
    match = f"{actor_type}/*" if actor_type else None
    limit = max(1, min(limit, MAX_LIST))
    names: list[str] = []
    while shard < keys.shard_count and len(names) < limit:
        if pos:  # the rest of a large shard
            pos, items = client.sscan(keys.shard(shard).actors, pos, match, count=limit)
            names += sorted(i.decode() for i in items)
            shard += 0 if pos else 1
            continue
        batch = range(shard, min(shard + 64, keys.shard_count))
        pipe = client.pipeline(transaction=False)
        for s in batch:
            pipe.sscan(keys.shard(s).actors, 0, match, count=limit)
        shard = batch.stop
        for s, (nxt, items) in zip(batch, pipe.execute(), strict=True):
            names += sorted(i.decode() for i in items)
            if nxt or len(names) >= limit:
                shard, pos = (s, int(nxt)) if nxt else (s + 1, 0)
                break
    more = shard < keys.shard_count
    return names, f"{shard}:{pos}" if more else None


def drain(
    client: redis.Redis, keys: KeySpace, node_id: str, undo: bool = False, force: bool = False
) -> dict[str, Any]:
    """Tell a node to hand its shards off (or, ``undo``, to take its share again).
    Refused for the last live node that serves, unless ``force``: its shards would
    have nowhere to go (it then keeps serving them until another node joins)."""
    now = int(time.time() * 1000)
    live = {m.decode() for m in client.zrangebyscore(keys.nodes, now, "+inf")}
    if undo:
        client.srem(keys.draining, node_id)
        return {"node": node_id, "draining": False}
    if node_id not in live:
        raise NotFoundError(f"no live node {node_id!r} (troth status lists them)")
    draining = {m.decode() for m in client.smembers(keys.draining)}
    if not (live - draining - {node_id}) and not force:
        raise AppError(
            f"{node_id} is the last live node that serves: its shards would have nowhere "
            "to go (start another node first, or force)"
        )
    client.sadd(keys.draining, node_id)
    return {"node": node_id, "draining": True}


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
    for entry_id, raw in client.hscan_iter(sk.outbox, match=f"{name}:*", count=500):
        e = OutboxEntry.load(entry_id, raw)
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
        "notifications": [
            {"id": nid.decode(), "data": codec.unpack(fields[b"d"])}
            for nid, fields in client.xrevrange(sk.notifications(str(name)), count=20)
        ],
    }
