"""``self.plugins.members``: a set of strings kept beside the actor's state.

For sets too large to rewrite with every commit (the subscribers of an event bus,
say): the set is one Redis key of the actor's shard, and adding or removing a
member writes that member only, in the actor's commit.

* ``add(member)`` and ``remove(member)`` are buffered like every effect: they are
  committed atomically with the transaction's state, or dropped with it;
* ``await contains(member)`` and ``await count()`` read the committed set, as
  changed by the transaction so far (async methods only: a read is a round trip,
  shared with other actors' through the node's batcher);
* readers outside the actor (an outbox executor fanning a message out, say) page
  through the committed set with :func:`scan_members`;
* the set goes with the actor when it deletes itself.

At most ``MAX_CHANGES`` changes per transaction; a member is at most
``MAX_MEMBER`` characters.
"""

from __future__ import annotations

from typing import Any, ClassVar

from troth.core.batcher import Command
from troth.core.names import ActorName, shard_of
from troth.core.plugin import ActorPlugin, PluginContext, PluginFactory
from troth.core.records import CommitOps, TxnInfo

MAX_CHANGES = 1000
MAX_MEMBER = 512


class Members(ActorPlugin):
    #: Its reads count the changes of the group's earlier calls (``_pending``).
    groupable: ClassVar[bool] = True

    def __init__(self, actor: ActorName, pstate: dict[str, Any], context: PluginContext) -> None:
        super().__init__(actor, pstate)
        self.context = context
        self._changes: dict[str, bool] = {}  # member -> present after this transaction
        #: The changes of the earlier calls of a group, not yet committed.
        self._pending: dict[str, bool] = {}

    def begin(self, txn: TxnInfo) -> None:
        super().begin(txn)
        # the call before (of the same group) succeeded: its changes await the commit
        self._pending.update(self._changes)
        self._changes.clear()

    def add(self, member: str) -> None:
        self._change(member, True)

    def remove(self, member: str) -> None:
        self._change(member, False)

    def _change(self, member: str, present: bool) -> None:
        self._require_txn()
        if not isinstance(member, str) or not 0 < len(member) <= MAX_MEMBER:
            raise ValueError(f"a member is a string of 1 to {MAX_MEMBER} characters")
        if member not in self._changes and len(self._changes) >= MAX_CHANGES:
            raise ValueError(f"at most {MAX_CHANGES} member changes per transaction")
        self._changes[member] = present

    async def contains(self, member: str) -> bool:
        present = self._changes.get(member, self._pending.get(member))
        if present is not None:
            return present
        (found,) = await read_members(self.context, self.actor, [("SISMEMBER", member)])
        return bool(found)

    async def count(self) -> int:
        changes = {**self._pending, **self._changes}
        reads: list[tuple[Any, ...]] = [("SCARD",)]
        if changes:
            reads.append(("SMISMEMBER", *changes))
        replies = await read_members(self.context, self.actor, reads)
        total = int(replies[0])
        if changes:
            for present, was in zip(changes.values(), replies[1], strict=True):
                total += int(present) - int(bool(was))
        return total

    def prepare(self, ops: CommitOps) -> None:
        for member, present in self._changes.items():
            (ops.members_add if present else ops.members_remove).append(member)

    def committed(self) -> None:
        super().committed()
        self._changes.clear()
        self._pending.clear()

    def abort(self) -> None:
        super().abort()
        self._changes.clear()
        self._pending.clear()

    def discard(self) -> None:
        self.txn = None
        self._changes.clear()


async def read_members(
    context: PluginContext, actor: ActorName, reads: list[tuple[Any, ...]]
) -> list[Any]:
    """Run read commands (a name and the arguments after the key) on ``actor``'s set."""
    keys = context.keys
    key = keys.shard(shard_of(actor, keys.shard_count)).members(str(actor))

    def add(commands: list[Command]) -> None:
        for name, *args in reads:
            commands.append((name, key, *args))

    return await context.batcher.results(add, len(reads))


async def scan_members(
    context: PluginContext, actor: ActorName, cursor: int, count: int
) -> tuple[int, list[str]]:
    """One page of ``actor``'s committed members, for readers outside the actor:
    (next cursor, members); the cursor is 0 after the last page. A member present
    throughout a scan is returned at least once (Redis ``SSCAN``)."""
    ((nxt, page),) = await read_members(context, actor, [("SSCAN", cursor, "COUNT", count)])
    return int(nxt), [m.decode() for m in page]


class MembersFactory(PluginFactory):
    name: ClassVar[str] = "members"

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Members(actor, pstate, self.context)
