"""The Redis key layout.

Every key that belongs to an actor lives in its shard, and every key of a shard
carries the hash tag ``{sN}``: one Lua script can therefore touch an actor's
checkpoint, its reply cache, its shard's outbox and timer index and the shard's
lease in one atomic step, on a single Redis as on Redis Cluster.

========================  =======  ==============================================
key                       type     content
========================  =======  ==============================================
P:nodes                   zset     node id -> heartbeat expiry (ms)
P:node:ID                 hash     node info: url, pid, started, active actors
P:urls                    hash     node id -> URL other nodes forward calls to
P:secret                  string   cluster secret authenticating node-to-node calls
P:draining                set      nodes told to hand their shards off (troth drain)
P:inbox:ID                list     operator commands for a node (JSON), read each beat
P:quota:PRINCIPAL         hash     actors created by the principal (quotas)
P:rate:PRINCIPAL:SECOND   string   events posted in that second (expires after 2 s)
P:{sN}:lease              hash     owner (node id), epoch (fencing token)
P:{sN}:ca:NAME            hash     state, version, seq, created, updated
P:{sN}:rp:NAME            hash     request id -> committed reply (msgpack)
P:{sN}:rpt:NAME           zset     request id -> commit time (ms), for trimming
P:{sN}:nt:NAME            stream   committed notifications for client sessions
P:{sN}:cas                set      names of the actors with a checkpoint
P:{sN}:auto               set      names of the autonomous actors (re-activated on claim)
P:{sN}:ob                 hash     outbox entry id -> entry (the activity ledger)
P:{sN}:obq                zset     outbox entry id -> next attempt (ms)
P:{sN}:tm                 zset     timer key -> due time (ms)
P:{sN}:td                 hash     timer key -> timer (msgpack)
========================  =======  ==============================================
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """The keys of one shard. The shard-wide names are made once, when the (cached)
    instance is: every commit and outbox write names several of them."""

    prefix: str
    shard: int
    tag: str = field(init=False, repr=False, compare=False)
    lease: str = field(init=False, repr=False, compare=False)
    actors: str = field(init=False, repr=False, compare=False)
    autonomous: str = field(init=False, repr=False, compare=False)
    outbox: str = field(init=False, repr=False, compare=False)
    outbox_queue: str = field(init=False, repr=False, compare=False)
    timers: str = field(init=False, repr=False, compare=False)
    timer_data: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tag = f"{self.prefix}:{{s{self.shard}}}"
        for name, suffix in _SHARD_WIDE:
            object.__setattr__(self, name, f"{tag}{suffix}")

    def checkpoint(self, name: str) -> str:
        return f"{self.tag}:ca:{name}"

    def replies(self, name: str) -> str:
        return f"{self.tag}:rp:{name}"

    def reply_times(self, name: str) -> str:
        return f"{self.tag}:rpt:{name}"

    def notifications(self, name: str) -> str:
        return f"{self.tag}:nt:{name}"

    def members(self, name: str) -> str:
        """The actor's member set (``self.plugins.members``)."""
        return f"{self.tag}:mb:{name}"


@dataclass(frozen=True, slots=True)
class KeySpace:
    """All keys of one troth deployment (one ``prefix`` on one Redis)."""

    prefix: str
    shard_count: int

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    @property
    def node_urls(self) -> str:
        return f"{self.prefix}:urls"

    @property
    def secret(self) -> str:
        return f"{self.prefix}:secret"

    @property
    def draining(self) -> str:
        return f"{self.prefix}:draining"

    def inbox(self, node_id: str) -> str:
        return f"{self.prefix}:inbox:{node_id}"

    def quota(self, principal: str) -> str:
        return f"{self.prefix}:quota:{principal}"

    def rate(self, principal: str, second: int) -> str:
        return f"{self.prefix}:rate:{principal}:{second}"

    def shard(self, shard: int) -> ShardKeys:
        return _shard_keys(self.prefix, shard)


@functools.lru_cache(maxsize=65536)
def _shard_keys(prefix: str, shard: int) -> ShardKeys:
    return ShardKeys(prefix, shard)


#: ShardKeys' shard-wide keys: attribute, suffix of the shard's tag.
_SHARD_WIDE = (
    ("tag", ""),
    ("lease", ":lease"),
    ("actors", ":cas"),
    ("autonomous", ":auto"),
    ("outbox", ":ob"),
    ("outbox_queue", ":obq"),
    ("timers", ":tm"),
    ("timer_data", ":td"),
)
