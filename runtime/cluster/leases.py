"""Shard leases, heartbeats and fencing epochs.

A node is alive while its entry in ``P:nodes`` (a heartbeat expiry) lies in the
future; it renews it once per heartbeat. A shard's lease names its owner and an
**epoch**: every claim bumps the epoch (``lua/claim.lua``, a compare-and-set on
the owner and epoch the claimer observed) and every commit checks it. So once
another node claimed a shard, the previous owner, even if it was only paused,
can never commit to it again: it is *fenced*.

Each heartbeat a node:

1. renews its own entry;
2. reads every lease (one pipelined round trip) to learn which shards it still
   owns, which belong to dead nodes, and which are free;
3. adopts every shard whose lease still names its own id but that it does not
   serve (a previous incarnation's, after a kill -9 and a quick restart under the
   same ``--node-id``; or one whose release failed), whatever its fair share:
   no other node may claim a lease held by a live node, so a lease left unadopted
   would be served by no one;
4. claims free or orphaned shards up to its fair share, ``ceil(shards / live)``;
5. gives back shards above that share, a few per beat, through the node (which
   first drains and passivates their actors), so that a joining node is not
   flooded.

A node beats again just after another node's entry expires when that comes before
its next heartbeat, so a killed node's shards are claimed a lease TTL after its last
beat rather than up to a heartbeat later.

Each beat also publishes the set of shards the node serves (``served``, a hex
bitmap in its node entry), so that ``troth status`` counts a shard as served only
when its owner says it serves it.

**Draining** (``troth drain NODE``): a node named in ``P:draining`` has a fair share
of zero and counts for no one's share, so it hands every shard off
(``DRAIN_PER_BEAT`` a beat, each drained of its actors first) and the other nodes
claim them; it keeps serving what it holds while no other live node could take it.
It stays up, answers ``/ready`` with 503 once it owns nothing, and takes shards
again when it is removed from the set (``troth drain --undo``, or its own graceful
stop: a restart after maintenance serves again).

Each beat also takes the node's **inbox** (``P:inbox:ID``, operator commands such as
"an outbox entry was re-driven") and hands the commands to the node.

The lease manager knows nothing of actors: it reports gains and losses to the
node's callbacks.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import redis
from redis.cluster import RedisCluster

from troth.core import tracing
from troth.core.clock import SYSTEM_CLOCK, Clock
from troth.core.keys import KeySpace
from troth.core.scripts import Script, load_lua

log = logging.getLogger(__name__)

#: At most this many shards are handed off per heartbeat when above fair share.
HANDOFF_PER_BEAT = 32
#: ... and when draining (an operator is waiting; the other nodes take them at once).
DRAIN_PER_BEAT = 256
#: Operator commands taken from the inbox per beat.
INBOX_PER_BEAT = 100


@dataclass(frozen=True, slots=True)
class LeaseView:
    owner: str
    epoch: str


class LeaseManager:
    def __init__(
        self,
        client: redis.Redis,
        keys: KeySpace,
        node_id: str,
        ttl_seconds: float,
        heartbeat_seconds: float,
        on_gained: Callable[[dict[int, str]], None],
        on_lost: Callable[[set[int]], None],
        on_surplus: Callable[[list[int]], None],
        node_info: Callable[[], dict[str, str]],
        on_commands: Callable[[list[bytes]], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.client = client
        #: Lease expiry compares this node's clock with the others': a node's clock is
        #: real time (the unit tests drive every node from one manual clock).
        self.clock = clock
        self.keys = keys
        self.node_id = node_id
        self.ttl_ms = int(ttl_seconds * 1000)
        self.heartbeat_seconds = heartbeat_seconds
        self.on_gained = on_gained
        self.on_lost = on_lost
        self.on_surplus = on_surplus
        self.node_info = node_info
        self.on_commands = on_commands
        #: This node was told to hand its shards off (``P:draining``), as of the last beat.
        self.draining = False
        self._claim = Script(load_lua("claim.lua"))
        self._release = Script(load_lua("release.lua"))
        self._leases = Script(load_lua("leases.lua"))
        #: Every shard's lease key, in shard order: each beat reads them all.
        self._lease_keys = [keys.shard(s).lease for s in range(keys.shard_count)]
        self._owned: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.live_nodes: list[str] = []
        #: The owner of every shard and the URL of every live node, as of the last beat:
        #: the routing table. A stale entry costs one redirected retry, never a wrong commit.
        self.owners: list[str] = [""] * keys.shard_count
        self.urls: dict[str, str] = {}
        self.last_beat_ok = 0.0
        #: Seconds until the next beat: the heartbeat, or sooner when another node's
        #: entry expires before then (see :meth:`_next_wait`).
        self.next_beat_in = heartbeat_seconds

    # -- queries -----------------------------------------------------------------------

    def epoch_of(self, shard: int) -> str | None:
        """The epoch this node holds ``shard`` at, or None if it does not own it."""
        with self._lock:
            return self._owned.get(shard)

    @property
    def owned(self) -> dict[int, str]:
        with self._lock:
            return dict(self._owned)

    def served_bitmap(self) -> str:
        """The shards this node serves, as the hex bitmap published in its node entry."""
        bits = bytearray((self.keys.shard_count + 7) // 8)
        for shard in self.owned:
            bits[shard // 8] |= 1 << (shard % 8)
        return bits.hex()

    def owner_of(self, shard: int) -> str:
        """The owner of ``shard`` as last seen ("" when none)."""
        if self.epoch_of(shard) is not None:
            return self.node_id
        return self.owners[shard]

    def refresh_owner(self, shard: int) -> str:
        """Read the current owner of ``shard`` from Redis (after a redirect)."""
        owner = (self.client.hget(self.keys.shard(shard).lease, "owner") or b"").decode()
        self.owners[shard] = owner
        return str(owner)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Beat once synchronously (so a lone node owns its shards on return), then loop."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="troth-leases", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if release:
            self.release(list(self.owned))
            try:
                self.client.zrem(self.keys.nodes, self.node_id)
                self.client.hdel(self.keys.node_urls, self.node_id)
                # Drained for maintenance, stopped: a restart under this id serves again.
                self.client.srem(self.keys.draining, self.node_id)
            except redis.RedisError as exc:
                log.warning("could not deregister node %s: %s", self.node_id, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.next_beat_in):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat failed")

    # -- one heartbeat -------------------------------------------------------------------

    def beat(self) -> None:
        with tracing.quiet():
            self._beat()

    def _beat(self) -> None:
        now = self.clock.now_ms()
        if self.last_beat_ok and self.clock.monotonic() - self.last_beat_ok > self.ttl_ms / 1000:
            # We were silent past our own lease (paused, or cut off from Redis):
            # others may have taken our shards. Whatever we still hold is re-checked
            # below; anything claimed meanwhile is reported lost.
            log.warning("node %s missed its lease; re-validating shards", self.node_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.keys.nodes, {self.node_id: now + self.ttl_ms})
        pipe.hset(self.keys.node(self.node_id), mapping=self.node_info())
        pipe.pexpire(self.keys.node(self.node_id), self.ttl_ms * 20)
        url = self.node_info().get("url", "")
        if url:
            pipe.hset(self.keys.node_urls, self.node_id, url)
        pipe.zrangebyscore(self.keys.nodes, now, "+inf", withscores=True)
        pipe.hgetall(self.keys.node_urls)
        pipe.smembers(self.keys.draining)
        inbox = self.keys.inbox(self.node_id)
        pipe.lrange(inbox, 0, INBOX_PER_BEAT - 1)
        pipe.ltrim(inbox, INBOX_PER_BEAT, -1)
        results = pipe.execute()
        leases = self._read_leases()
        self.last_beat_ok = self.clock.monotonic()
        head = 4 if url else 3
        expiries = {n.decode(): int(score) for n, score in results[head]}
        live = sorted(expiries)
        urls = {k.decode(): v.decode() for k, v in results[head + 1].items()}
        draining = {n.decode() for n in results[head + 2]}
        self.live_nodes = live
        self.urls = {n: urls[n] for n in live if urls.get(n)}
        self.owners = [
            lv.owner if lv is not None else self.owners[s] for s, lv in enumerate(leases)
        ]
        self._reconcile(leases, set(live), draining)
        self.next_beat_in = self._next_wait(expiries)
        if results[head + 3] and self.on_commands is not None:
            self.on_commands(results[head + 3])

    def _next_wait(self, expiries: dict[str, int]) -> float:
        """Seconds to the next beat (see the module docstring). A live node renews its
        entry a TTL ahead every heartbeat, so only a node that stopped beating (or is
        late: then the extra beat finds it alive) shortens the wait."""
        others = [at for node, at in expiries.items() if node != self.node_id]
        if not others:
            return self.heartbeat_seconds
        until = (min(others) - self.clock.now_ms()) / 1000 + 0.005
        return max(0.005, min(self.heartbeat_seconds, until))

    def _read_leases(self) -> list[LeaseView | None]:
        """Every shard's lease: one script call on a single Redis (a pipeline of 1,024
        reads cost the node ~20 ms of CPU a beat); on Redis Cluster one pipelined read
        per master, None for the shards of a master that did not answer (one failing
        master leaves the others' shards to be served, claimed and released as usual)."""
        leases: list[LeaseView | None] = [None] * self.keys.shard_count
        if not isinstance(self.client, RedisCluster):
            (flat,) = self._leases.run_many(self.client, [(self._lease_keys, [])])
            for shard in range(self.keys.shard_count):
                o, e = flat[2 * shard], flat[2 * shard + 1]
                leases[shard] = LeaseView((o or b"").decode(), (e or b"0").decode())
            return leases
        for shards in self._by_master(range(self.keys.shard_count)):
            pipe = self.client.pipeline(transaction=False)
            for shard in shards:
                pipe.hmget(self.keys.shard(shard).lease, ["owner", "epoch"])
            try:
                replies = pipe.execute()
            except redis.RedisError as exc:
                if len(shards) == self.keys.shard_count:
                    raise
                log.warning("heartbeat: %d shards' leases unread: %s", len(shards), exc)
                continue
            for shard, (o, e) in zip(shards, replies, strict=True):
                leases[shard] = LeaseView((o or b"").decode(), (e or b"0").decode())
        return leases

    def _by_master(self, shards: Iterable[int]) -> list[list[int]]:
        """``shards`` grouped by the Redis master that holds their lease (one group on a
        single Redis)."""
        if not isinstance(self.client, RedisCluster):
            return [list(shards)]
        groups: dict[str, list[int]] = {}
        for shard in shards:
            node = self.client.get_node_from_key(self.keys.shard(shard).lease)
            groups.setdefault(node.name, []).append(shard)
        return list(groups.values())

    def _reconcile(
        self,
        leases: list[LeaseView | None],
        live: set[str],
        draining: AbstractSet[str] = frozenset(),
    ) -> None:
        """Keep, lose, adopt or claim shards from what the beat read. A shard whose
        lease could not be read (its master is failing over) is left as it is: kept if
        this node held it (its commits are still fenced by Redis), not claimed.
        Draining nodes take no share (see the module docstring)."""
        with self._lock:
            mine_before = dict(self._owned)
        still_mine = {
            s: mine_before[s] if lv is None else lv.epoch
            for s, lv in enumerate(leases)
            if s in mine_before
            and (lv is None or (lv.owner, lv.epoch) == (self.node_id, mine_before[s]))
        }
        lost = set(mine_before) - set(still_mine)
        if lost:
            with self._lock:
                for s in lost:
                    self._owned.pop(s, None)
            log.warning("node %s lost %d shards to other nodes", self.node_id, len(lost))
            self.on_lost(lost)
        adopt = [
            s
            for s, lv in enumerate(leases)
            if lv is not None and lv.owner == self.node_id and s not in still_mine
        ]
        takers = (live | {self.node_id}) - draining
        was_draining, self.draining = self.draining, self.node_id in draining
        if self.draining != was_draining:
            log.info("node %s: %s", self.node_id, "draining" if self.draining else "serving")
        if not self.draining:
            share = math.ceil(self.keys.shard_count / len(takers))
        elif takers:
            share = 0
        else:  # no other live node could take them: keep serving
            share = len(still_mine) + len(adopt)
        free = [
            s
            for s, lv in enumerate(leases)
            if lv is not None
            and s not in still_mine
            and lv.owner != self.node_id
            and lv.owner not in live
        ]
        random.shuffle(free)
        room = share - len(still_mine) - len(adopt)
        claim = adopt + free[: max(0, room)]
        if claim:
            gained = self._claim_many({s: lv for s in claim if (lv := leases[s]) is not None})
            if gained:
                with self._lock:
                    self._owned.update(gained)
                for shard in gained:
                    self.owners[shard] = self.node_id
                self.on_gained(gained)
        elif room < 0:
            per_beat = DRAIN_PER_BEAT if self.draining else HANDOFF_PER_BEAT
            surplus = sorted(still_mine)[: min(-room, per_beat)]
            self.on_surplus(surplus)

    def _claim_many(self, seen: dict[int, LeaseView]) -> dict[int, str]:
        """Claim each shard from the owner and epoch its lease had (compare-and-set)."""
        calls = [
            ([self.keys.shard(s).lease], [self.node_id, lv.owner, lv.epoch])
            for s, lv in seen.items()
        ]
        gained = {}
        for s, res in zip(seen, self._claim.run_many(self.client, calls), strict=True):
            if res is not None:
                gained[s] = str(int(res))
        return gained

    def release(self, shards: list[int]) -> None:
        """Give shards back (the node has drained them). Their epoch stays."""
        if not shards:
            return
        with self._lock:
            held = {s: self._owned.pop(s) for s in shards if s in self._owned}
        if not held:
            return
        for shard in held:
            self.owners[shard] = ""
        calls = [([self.keys.shard(s).lease], [self.node_id, e]) for s, e in held.items()]
        try:
            self._release.run_many(self.client, calls)
        except redis.RedisError as exc:
            log.warning(
                "releasing %d shards failed (they expire with the lease): %s", len(held), exc
            )
