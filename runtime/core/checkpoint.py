"""The checkpoint store: loading an actor and committing a transaction to Redis.

The commit is one Lua script (``lua/commit.lua``) and therefore atomic: the new
state, the state version, the message sequence number, the replies kept for
``request_id`` de-duplication, the outbox entries and the timer changes are all
written, or none is. The script first checks two guards:

* **fencing**: the shard's lease still names this node at the epoch the node
  claimed it with; a node that lost its shard can never commit again;
* **sequence**: the stored ``seq`` is the one this activation loaded, so two
  activations of one actor can never interleave their commits.

A timer firing adds a third guard: the timer must still exist with the same id,
and is deleted in the same commit as its handler's state (exactly-once).

Plugins may add steps of their own to the script (:meth:`CheckpointStore.add_steps`,
:class:`~troth.core.records.CommitStep`): their checks are guards like these, their
writes are part of the commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from troth.core import codec
from troth.core.batcher import Batcher, Command
from troth.core.clock import SYSTEM_CLOCK, Clock
from troth.core.keys import KeySpace
from troth.core.records import CommitOps
from troth.core.scripts import Script, load_lua

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StoredCheckpoint:
    """An actor's checkpoint as read from Redis."""

    state: dict[str, Any]
    pstate: dict[str, Any]
    version: str
    seq: int
    created_ms: int
    updated_ms: int
    #: ``state`` and ``pstate`` as stored (the activation's baseline needs no repacking).
    packed_state: bytes = b""
    packed_pstate: bytes = b""


@dataclass(slots=True)
class CommitRequest:
    """Everything one transaction asks the store to write."""

    name: str
    shard: int
    epoch: str
    expected_seq: int
    state: bytes
    pstate: bytes
    version: str
    #: ``(request_id, packed reply)`` of each message with a request id, kept for
    #: de-duplication; several when messages are committed together.
    replies: list[tuple[str, bytes]] = field(default_factory=list)
    #: How many messages this commit settles: the checkpoint's ``seq`` moves by as many.
    messages: int = 1
    ops: CommitOps = field(default_factory=CommitOps)
    fired_timer: tuple[str, str] | None = None
    #: The outbox entry whose result this commit takes in (it is deleted with it).
    settled_entry: str | None = None
    autonomous: bool = False
    #: The actor deletes itself in this commit (every key of its own goes).
    delete: bool = False
    #: A new actor's owner, whose count of actors goes up once the commit succeeded
    #: (a crash in between leaves the actor uncounted).
    count_for: str | None = None
    #: The commit script's keys of this actor (:meth:`CheckpointStore.commit_keys`),
    #: the same for every commit of an activation; made by the store if empty.
    keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CommitResult:
    ok: bool
    reason: str = ""
    detail: str = ""


class CheckpointStore:
    """Reads and writes actor checkpoints through the node's :class:`Batcher`, so that
    every load, look-up and commit of one loop turn shares one round trip.

    All methods are coroutines of the engine's event loop.
    """

    def __init__(
        self,
        batcher: Batcher,
        keys: KeySpace,
        node_id: str,
        reply_cache_max: int = 1000,
        reply_cache_seconds: float = 86_400.0,
        notify_max: int = 1000,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.batcher = batcher
        #: The time of every commit (reply expiry, transaction times) comes from here.
        self.clock = clock
        self.keys = keys
        self.node_id = node_id
        self.reply_cache_max = reply_cache_max
        self.reply_cache_ms = int(reply_cache_seconds * 1000)
        self.notify_max = notify_max
        self._commit = _commit_script({})

    def add_steps(self, steps: Mapping[str, str]) -> None:
        """Make plugins' commit steps known, before the first commit: step name -> the
        Lua chunk that defines it as ``STEPS[name] = {check = fn, apply = fn}``
        (either may be left out), each ``fn(keys, args)``. A check returns nothing to
        let the commit go on, or a reason (a string) to refuse it; it must not write.
        The chunks become part of the commit script (a digest of their own)."""
        self._commit = _commit_script(steps)

    async def load(
        self, shard: int, name: str, count_of: str | None = None
    ) -> tuple[StoredCheckpoint | None, int]:
        """The checkpoint of ``name`` (None if it has none) and, in the same round trip,
        how many actors the principal ``count_of`` created (its quota count; 0 if
        not asked)."""
        key = self.keys.shard(shard).checkpoint(name)
        fields = ["state", "pstate", "version", "seq", "created", "updated"]
        quota = self.keys.quota(count_of) if count_of else None

        def add(commands: list[Command]) -> None:
            commands.append(("HMGET", key, *fields))
            if quota:
                commands.append(("HGET", quota, "actors"))

        replies = await self.batcher.results(add, 2 if quota else 1)
        reply = replies[0]
        created_count = int(replies[1] or 0) if quota else 0
        if reply[0] is None:
            return None, created_count
        state, pstate, version, seq, created, updated = reply
        stored = StoredCheckpoint(
            state=codec.unpack(state),
            pstate=codec.unpack(pstate) if pstate else {},
            version=version.decode(),
            seq=int(seq),
            created_ms=int(created or 0),
            updated_ms=int(updated or 0),
            packed_state=state,
            packed_pstate=pstate or b"",
        )
        return stored, created_count

    async def committed_reply(self, shard: int, name: str, request_id: str) -> tuple[Any] | None:
        """``(reply,)`` as committed for ``request_id``, or ``None`` if there is none."""
        key = self.keys.shard(shard).replies(name)
        (data,) = await self.batcher.results(lambda c: c.append(("HGET", key, request_id)))
        return None if data is None else (codec.unpack(data)[0],)

    async def holds(self, shard: int, epoch: str) -> str | None:
        """None while this node holds ``shard`` at ``epoch``; else who does (a read that
        writes nothing: how a read-only message is fenced)."""
        lease = self.keys.shard(shard).lease
        (reply,) = await self.batcher.results(
            lambda c: c.append(("HMGET", lease, "owner", "epoch"))
        )
        owner, held = (_text(v) if v is not None else "" for v in reply)
        return None if (owner, held) == (self.node_id, epoch) else f"{owner}@{held}"

    async def commit(self, req: CommitRequest) -> CommitResult:
        """One transaction's atomic, fenced commit (``lua/commit.lua``; also when the
        actor deletes itself): :meth:`send`, :meth:`result`, then :meth:`count_new`.

        Redis errors propagate: the outcome is then unknown, and the ``seq`` guard
        makes a retry of the same request safe.
        """
        result = self.result(await self.send(req))
        if result.ok and req.count_for:
            await self.count_new(req)
        return result

    def send(self, req: CommitRequest) -> asyncio.Future[list[Any]]:
        """Queue the commit's round trip; the future of its reply, for :meth:`result`.
        (A future rather than a coroutine: the engine awaits it without a frame of
        this store's held for each message in flight.)"""
        script = self._commit
        keys: Sequence[str] = req.keys or self.commit_keys(req.shard, req.name)
        if req.ops.steps:
            keys = [*keys, *(k for step in req.ops.steps for k in step.keys)]
        args = [self.node_id, req.epoch, str(req.expected_seq), self._payload(req)]
        return self.batcher.submit(lambda c: script.queue(c, keys, args), 1, script)

    @staticmethod
    def result(replies: list[Any]) -> CommitResult:
        """What a commit's reply says; an error reply is raised."""
        res = replies[0]
        if isinstance(res, Exception):
            raise res
        if int(res[0]) != 1:
            return CommitResult(False, _text(res[1]), _text(res[2]) if len(res) > 2 else "")
        return _COMMITTED

    async def count_new(self, req: CommitRequest) -> None:
        """After a new actor's commit (a refused one creates no actor): its owner's count
        of actors goes up. A failure is logged; the actor is committed all the same,
        and only the count lags."""
        assert req.count_for is not None
        quota = self.keys.quota(req.count_for)
        try:
            await self.batcher.results(lambda c: c.append(("HINCRBY", quota, "actors", 1)))
        except Exception as exc:
            log.warning("counting %s's new actor %s failed: %s", req.count_for, req.name, exc)

    def commit_keys(self, shard: int, name: str) -> tuple[str, ...]:
        """The keys of ``lua/commit.lua`` that an actor's every commit names (an
        activation makes them once: building five of them a commit cost more than
        5% of a message at 10,000 actors)."""
        sk = self.keys.shard(shard)
        return (
            sk.lease,
            sk.checkpoint(name),
            sk.replies(name),
            sk.reply_times(name),
            sk.actors,
            sk.outbox,
            sk.outbox_queue,
            sk.timers,
            sk.timer_data,
            sk.autonomous,
            sk.notifications(name),
            sk.members(name),
        )

    def _payload(self, req: CommitRequest) -> bytes:
        now = self.clock.now_ms()
        payload: dict[str, Any] = {
            "n": req.name,
            "seq": str(req.expected_seq + req.messages),
            "st": req.state,
            "ps": req.pstate,
            "v": req.version,
            "now": str(now),
            "ob": [[e.id, codec.pack(e.to_dict()), str(e.next_ms)] for e in req.ops.outbox],
            "ts": [[t.key, t.encode(), str(t.due_ms)] for t in req.ops.timers_set],
            "tc": list(req.ops.timers_cancel),
            "nt": req.ops.notifications,
            "ntmax": str(self.notify_max),
        }
        if req.replies:
            payload.update(
                rr=[list(r) for r in req.replies],
                rmax=str(self.reply_cache_max),
                cut=str(now - self.reply_cache_ms),
            )
        if req.ops.steps:
            payload["x"] = [[s.name, len(s.keys), *s.args] for s in req.ops.steps]
        if req.ops.outbox_withdraw:
            payload["ow"] = list(req.ops.outbox_withdraw)
        if req.ops.members_remove:
            payload["mr"] = req.ops.members_remove
        if req.ops.members_add:
            payload["ma"] = req.ops.members_add
        if req.autonomous:
            payload["au"] = 1
        if req.fired_timer is not None:
            payload["tf"] = list(req.fired_timer)
        if req.settled_entry is not None:
            payload["od"] = req.settled_entry
        if req.delete:
            payload["del"] = 1
        return codec.pack_for_lua(payload)


def _commit_script(steps: Mapping[str, str]) -> Script:
    chunks = [f"-- step {name}\n{lua}\n" for name, lua in sorted(steps.items())]
    return Script("".join(["local STEPS = {}\n", *chunks, load_lua("commit.lua")]))


_COMMITTED = CommitResult(ok=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
