"""Who a log line is about: the node, the actor, the request and the trace.

The engine binds a :class:`LogContext` for each message it handles (and the outbox
for each attempt); it lives in a :class:`~contextvars.ContextVar`, so it follows
the message into ``async`` methods and into the thread that runs a plain method,
and never leaks to another actor's message. ``troth serve``'s log formatter
(:mod:`troth.edge.logs`) writes it on every line; the trace id comes from the
OpenTelemetry span current at that moment, when tracing is on.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import NamedTuple


class LogContext(NamedTuple):
    """A tuple, not a dataclass: one is made for every message handled."""

    node: str
    actor: str | None = None
    request_id: str | None = None


#: The context of the message being handled (None outside one).
CURRENT: ContextVar[LogContext | None] = ContextVar("troth_log_context", default=None)


def bind(node: str, actor: str | None = None, request_id: str | None = None) -> None:
    """Bind the context of the work the current task (or thread) does from now on."""
    CURRENT.set(LogContext(node, actor, request_id))
