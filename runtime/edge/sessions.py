"""Client sessions over WebSocket (``/v1/ws``): calls and notifications.

The protocol is JSON, one object per message, validated with pydantic; a frame
carries one message, or a JSON array of several (a batch: see
:mod:`troth.core.frames`).

Client to node::

    {"op": "call", "id": "c1", "actor": "counter/alice-c1", "method": "increment",
     "args": [1], "kwargs": {}, "request_id": "...", "first": true}
    {"op": "subscribe", "actor": "counter/alice-c1", "since": "0-0"}
    {"op": "unsubscribe", "actor": "counter/alice-c1"}

Node to client::

    {"op": "hello", "node": "...", "nodes": ["http://...", ...], "batch_bytes": 1048576}
    {"op": "reply", "id": "c1", "result": ...}
    {"op": "error", "id": "c1", "error": {"type": ..., "message": ...}}
    {"op": "notify", "actor": "...", "nid": "1700000000000-0", "data": ...}

Calls are routed like HTTP calls (any node accepts any call) and run concurrently;
replies carry the call's ``id``. ``first`` (optional) says that ``request_id`` was
made up by the client for this very attempt: no reply can be committed for it yet,
so the node does not look one up (a Redis read less a call); a client that sets it
on a repeated id only loses the de-duplication of its own call. A subscription
streams the actor's committed notifications after ``since`` (a notification id;
``"0-0"`` for all that are kept), in commit order. ``hello`` lists the live nodes so
that a client can reconnect elsewhere when this node dies; it then resends its
pending calls with the same ``request_id`` (never applied twice) and resubscribes
after the last id it saw (never delivered twice). ``batch_bytes`` is the largest
frame the node takes (``node.max_body_bytes``), batch or not; a batch holds at most
1,000 messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from starlette.websockets import WebSocket, WebSocketDisconnect

from troth.cluster.routing import Router
from troth.core import aio, frames, jsonsafe
from troth.core.access import Caller
from troth.core.errors import BadRequestError, ForbiddenError, TrothError, UnavailableError
from troth.core.metrics import NodeMetrics
from troth.core.names import ActorName, check_method, shard_of
from troth.edge.notify_hub import NotificationHub, Subscription

log = logging.getLogger(__name__)

MAX_INFLIGHT = 1000
MAX_SUBSCRIPTIONS = 100
#: A batch frame the node sends stays within this many characters (a longer message
#: goes alone), well below the client library's largest frame (16 MiB).
FRAME_CHARS = 1 << 20
#: Largest stream id part (Redis stream ids are two unsigned 64-bit integers).
_U64 = 2**64 - 1


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CallOp(_Op):
    op: Literal["call"]
    id: str = Field(min_length=1, max_length=100)
    actor: str = Field(max_length=300)
    method: str = Field(max_length=100)
    args: list[Any] = Field(default_factory=list, max_length=100)
    kwargs: dict[str, Any] = Field(default_factory=dict, max_length=100)
    request_id: str | None = Field(None, min_length=1, max_length=200)
    #: ``request_id`` was made up for this very attempt (see the module docstring).
    first: bool = False


def _stream_id(value: str) -> str:
    ms, _, seq = value.partition("-")
    if int(ms) > _U64 or int(seq) > _U64:
        raise ValueError("stream id parts must be at most 2**64-1")
    return value


class SubscribeOp(_Op):
    op: Literal["subscribe"]
    actor: str = Field(max_length=300)
    since: str = Field("0-0", pattern=r"^\d{1,20}-\d{1,20}$")

    _since = field_validator("since")(_stream_id)


class UnsubscribeOp(_Op):
    op: Literal["unsubscribe"]
    actor: str = Field(max_length=300)


ClientOp: TypeAdapter[CallOp | SubscribeOp | UnsubscribeOp] = TypeAdapter(
    Annotated[CallOp | SubscribeOp | UnsubscribeOp, Field(discriminator="op")]
)


class SessionServer:
    """Serves the WebSocket sessions of one node."""

    def __init__(
        self,
        router: Router,
        hub: NotificationHub,
        metrics: NodeMetrics,
        max_sessions: int,
        max_frame_bytes: int,
    ) -> None:
        self.router = router
        self.max_frame_bytes = max_frame_bytes
        self.leases = router.leases
        self.hub = hub
        self.max_sessions = max_sessions
        self.active = 0
        metrics.sessions.set_function(lambda: self.active)
        metrics.subscriptions.set_function(lambda: len(hub))

    async def serve(self, ws: WebSocket, principal: str | None) -> None:
        if self.active >= self.max_sessions:
            await ws.close(code=1013, reason="too many sessions")
            return
        self.active += 1
        session = _Session(self, ws, principal)
        try:
            await session.run()
        finally:
            self.active -= 1

    async def close(self) -> None:
        await self.hub.close()


class _Session:
    def __init__(self, server: SessionServer, ws: WebSocket, principal: str | None) -> None:
        self.server = server
        self.ws = ws
        self.principal = principal
        self.calls: set[asyncio.Task[None]] = set()
        self.subs: dict[str, Subscription] = {}
        #: The client sent a batch: it takes batches (see :meth:`send`).
        self.batched = False
        self._pending: list[str] = []
        self._writer: asyncio.Task[None] | None = None
        #: Set while fewer than ``frames.MAX_BATCH`` messages wait for the writer.
        self._room = asyncio.Event()
        self._room.set()

    async def send(self, message: dict[str, Any]) -> None:
        """Send ``message``, in order with every other. To a session that sends
        batches, the messages of one turn of the event loop go out together (a batch
        frame, written by one task); to any other, one text frame each, with no lock:
        uvicorn writes each frame whole, in one write, so frames never interleave.

        Bounded either way: a batched session holds at most ``frames.MAX_BATCH``
        messages unsent, then its senders wait (as they wait for a slow reader
        otherwise)."""
        text = jsonsafe.dumps(message).decode()
        if not self.batched:
            await self.ws.send({"type": "websocket.send", "text": text})
            return
        while len(self._pending) >= frames.MAX_BATCH:  # the client reads slower than it calls
            self._room.clear()
            await self._room.wait()
        self._pending.append(text)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        """Write what is waiting, as batch frames, until nothing is."""
        try:
            while self._pending:
                pending, self._pending = self._pending, []
                self._room.set()
                for frame in frames.join(pending, FRAME_CHARS):
                    await self.ws.send({"type": "websocket.send", "text": frame})
        except Exception:  # the session ended: its run loop sees to the rest
            self._pending.clear()
        finally:
            self._writer = None
            self._room.set()

    async def run(self) -> None:
        await self.ws.accept()
        leases = self.server.leases
        nodes = [leases.urls[n] for n in leases.live_nodes if n in leases.urls]
        await self.send(
            {
                "op": "hello",
                "node": leases.node_id,
                "nodes": nodes,
                "batch_bytes": self.server.max_frame_bytes,
            }
        )
        try:
            while True:
                frame = await self.ws.receive()
                if frame["type"] == "websocket.disconnect":
                    break
                if frame.get("text") is None:
                    await self.ws.close(code=1003, reason="frames must be JSON text")
                    break
                try:
                    raw = jsonsafe.loads(frame["text"], "frame")
                except BadRequestError as exc:
                    await self._error(None, exc)
                    continue
                if not isinstance(raw, list):
                    await self._op(raw)
                elif len(raw) > frames.MAX_BATCH:
                    await self._error(
                        None, BadRequestError(f"at most {frames.MAX_BATCH} ops a frame")
                    )
                else:
                    self.batched = True
                    for one in raw:
                        await self._op(one)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            for task in self.calls:
                task.cancel()
            if self._writer is not None:
                self._writer.cancel()
            for actor in list(self.subs):
                self._unsubscribe(actor)

    async def _op(self, raw: Any) -> None:
        """Validate and start one op of a frame."""
        try:
            op = ClientOp.validate_python(raw)
        except ValidationError as exc:
            await self.send(
                {
                    "op": "error",
                    "id": _id_of(raw),
                    "error": {"type": "ValidationError", "message": str(exc)},
                }
            )
            return
        if isinstance(op, CallOp):
            if len(self.calls) >= MAX_INFLIGHT:
                busy = UnavailableError(f"at most {MAX_INFLIGHT} calls in flight a session")
                await self._error(op.id, busy)
                return
            task = aio.start(self._call(op))
            self.calls.add(task)
            task.add_done_callback(self.calls.discard)
        elif isinstance(op, SubscribeOp):
            await self._subscribe(op)
        else:
            self._unsubscribe(op.actor)

    def _actor(self, text: str) -> ActorName:
        name = ActorName.parse(text)
        if self.principal is not None and name.owner != self.principal:
            raise ForbiddenError(f"principal {self.principal!r} does not own {name}")
        return name

    async def _error(self, call_id: str | None, exc: TrothError) -> None:
        await self.send({"op": "error", "id": call_id, "error": exc.to_dict()})

    async def _call(self, op: CallOp) -> None:
        try:
            name = ActorName.parse(op.actor)
            check_method(op.method)
            result = await self.server.router.call(
                name,
                op.method,
                op.args,
                op.kwargs,
                op.request_id,
                Caller(self.principal),
                new_id=op.first and op.request_id is not None,
            )
        except TrothError as exc:
            await self._error(op.id, exc)
            return
        except Exception as exc:
            log.exception("session call %s failed", op.id)
            await self.send(
                {
                    "op": "error",
                    "id": op.id,
                    "error": {"type": "InternalError", "message": str(exc)},
                }
            )
            return
        with contextlib.suppress(Exception):
            await self.send({"op": "reply", "id": op.id, "result": result})

    async def _subscribe(self, op: SubscribeOp) -> None:
        try:
            name = self._actor(op.actor)
            if op.actor not in self.subs and len(self.subs) >= MAX_SUBSCRIPTIONS:
                raise BadRequestError(f"at most {MAX_SUBSCRIPTIONS} subscriptions per session")
            self._unsubscribe(op.actor)
            keys = self.server.leases.keys
            key = keys.shard(shard_of(name, keys.shard_count)).notifications(str(name))

            async def forward(nid: str, data: Any) -> None:
                await self.send({"op": "notify", "actor": str(name), "nid": nid, "data": data})

            self.subs[op.actor] = self.server.hub.subscribe(key, op.since, forward)
        except TrothError as exc:
            await self._error(f"subscribe:{op.actor}", exc)

    def _unsubscribe(self, actor: str) -> None:
        sub = self.subs.pop(actor, None)
        if sub is not None:
            self.server.hub.unsubscribe(sub)


def _id_of(raw: Any) -> Any:
    return raw.get("id") if isinstance(raw, dict) else None
