"""``self.plugins.session``: notifications pushed to client sessions.

``notify(data)`` buffers a notification; the commit appends it to the actor's
notification stream in Redis, atomically with the state that caused it, and the
clients subscribed to the actor (over the node's WebSocket, from any node) receive
it. Guarantees: a notification exists only if its transaction committed; a client
receives an actor's notifications **in commit order**, each **once**, also across
reconnects to other nodes (it resumes after the last id it saw). The stream keeps
the last ``runtime.notify_max`` notifications per actor: a client away longer than
that misses the oldest ones.
"""

from __future__ import annotations

from typing import Any, ClassVar

from troth.core import codec
from troth.core.names import ActorName
from troth.core.plugin import ActorPlugin, BufferingPlugin, PluginFactory
from troth.core.records import CommitOps

MAX_PER_TXN = 100
MAX_BYTES = 64 * 1024


class Session(BufferingPlugin[bytes]):
    groupable: ClassVar[bool] = True  # notifications are only buffered

    def notify(self, data: Any) -> None:
        """Queue ``data`` (JSON-compatible, at most 64 KiB encoded) for subscribers."""
        self._require_txn()
        if len(self._buffer) >= MAX_PER_TXN:
            raise ValueError(f"at most {MAX_PER_TXN} notifications per transaction")
        packed = codec.pack(data)
        if len(packed) > MAX_BYTES:
            raise ValueError(f"a notification may be at most {MAX_BYTES} bytes encoded")
        self._buffer.append(packed)

    def _flush(self, ops: CommitOps, buffer: list[bytes]) -> None:
        ops.notifications.extend(buffer)


class SessionFactory(PluginFactory):
    name: ClassVar[str] = "session"

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Session(actor, pstate)
