"""Client sessions over WebSocket (``/v1/ws``): calls and notifications.

The protocol is JSON, one object per message, validated with pydantic.

Client to node::

    {"op": "call", "id": "c1", "actor": "counter/alice-c1", "method": "increment",
     "args": [1], "kwargs": {}, "request_id": "..."}
    {"op": "subscribe", "actor": "counter/alice-c1", "since": "0-0"}
    {"op": "unsubscribe", "actor": "counter/alice-c1"}

Node to client::

    {"op": "hello", "node": "...", "nodes": ["http://...", ...]}
    {"op": "reply", "id": "c1", "result": ...}
    {"op": "error", "id": "c1", "error": {"type": ..., "message": ...}}
    {"op": "notify", "actor": "...", "nid": "1700000000000-0", "data": ...}

Calls are routed like HTTP calls (any node accepts any call) and run concurrently;
replies carry the call's ``id``. A subscription streams the actor's committed
notifications after ``since`` (a notification id; ``"0-0"`` for all that are kept),
in commit order. ``hello`` lists the live nodes so that a client can reconnect
elsewhere when this node dies; it then resends its pending calls with the same
``request_id`` (never applied twice) and resubscribes after the last id it saw
(never delivered twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any, Literal

import redis.asyncio as aredis
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from . import codec
from .errors import BadRequestError, ForbiddenError, TrothError
from .names import ActorName, shard_of
from .node import Node

log = logging.getLogger(__name__)

MAX_INFLIGHT = 1000
MAX_SUBSCRIPTIONS = 100
READ_BLOCK_MS = 2000
READ_COUNT = 100


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


class SubscribeOp(_Op):
    op: Literal["subscribe"]
    actor: str = Field(max_length=300)
    since: str = Field("0-0", pattern=r"^\d+-\d+$")


class UnsubscribeOp(_Op):
    op: Literal["unsubscribe"]
    actor: str = Field(max_length=300)


ClientOp: TypeAdapter[CallOp | SubscribeOp | UnsubscribeOp] = TypeAdapter(
    Annotated[CallOp | SubscribeOp | UnsubscribeOp, Field(discriminator="op")]
)


class SessionServer:
    """Serves the WebSocket sessions of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.active = 0
        self._redis: aredis.Redis | None = None

    def _aredis(self) -> aredis.Redis:
        # Created on first use, inside the serving event loop it belongs to.
        if self._redis is None:
            self._redis = aredis.Redis.from_url(
                self.node.redis_url,
                max_connections=MAX_SUBSCRIPTIONS * 10,
                socket_timeout=READ_BLOCK_MS / 1000 + 10,
            )
        return self._redis

    async def serve(self, ws: WebSocket, principal: str | None) -> None:
        if self.active >= self.node.config.runtime.max_sessions:
            await ws.close(code=1013, reason="too many sessions")
            return
        self.active += 1
        session = _Session(self, ws, principal)
        try:
            await session.run()
        finally:
            self.active -= 1

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


class _Session:
    def __init__(self, server: SessionServer, ws: WebSocket, principal: str | None) -> None:
        self.server = server
        self.node = server.node
        self.ws = ws
        self.principal = principal
        self.send_lock = asyncio.Lock()
        self.calls: set[asyncio.Task[None]] = set()
        self.subs: dict[str, asyncio.Task[None]] = {}

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.ws.send_json(message)

    async def run(self) -> None:
        await self.ws.accept()
        leases = self.node.leases
        nodes = [leases.urls[n] for n in leases.live_nodes if n in leases.urls]
        await self.send({"op": "hello", "node": self.node.node_id, "nodes": nodes})
        try:
            while True:
                raw = await self.ws.receive_json()
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
                    continue
                if isinstance(op, CallOp):
                    if len(self.calls) >= MAX_INFLIGHT:
                        await self._error(op.id, BadRequestError("too many calls in flight"))
                        continue
                    task = asyncio.create_task(self._call(op))
                    self.calls.add(task)
                    task.add_done_callback(self.calls.discard)
                elif isinstance(op, SubscribeOp):
                    await self._subscribe(op)
                else:
                    task_ = self.subs.pop(op.actor, None)
                    if task_ is not None:
                        task_.cancel()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            for task in [*self.calls, *self.subs.values()]:
                task.cancel()

    def _actor(self, text: str) -> ActorName:
        name = ActorName.parse(text)
        if self.principal is not None and name.owner != self.principal:
            raise ForbiddenError(f"principal {self.principal!r} does not own {name}")
        return name

    async def _error(self, call_id: str, exc: TrothError) -> None:
        await self.send({"op": "error", "id": call_id, "error": exc.to_dict()})

    async def _call(self, op: CallOp) -> None:
        try:
            name = self._actor(op.actor)
            result = await self.node.router.call(name, op.method, op.args, op.kwargs, op.request_id)
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
        except TrothError as exc:
            await self._error(f"subscribe:{op.actor}", exc)
            return
        if op.actor not in self.subs and len(self.subs) >= MAX_SUBSCRIPTIONS:
            await self._error(f"subscribe:{op.actor}", BadRequestError("too many subscriptions"))
            return
        old = self.subs.pop(op.actor, None)
        if old is not None:
            old.cancel()
        self.subs[op.actor] = asyncio.create_task(self._stream(name, op.since))

    async def _stream(self, name: ActorName, since: str) -> None:
        """Forward committed notifications after ``since``, in order, until cancelled."""
        client = self.server._aredis()
        key = self.node.keys.shard(shard_of(name, self.node.keys.shard_count)).notifications(
            str(name)
        )
        last = since
        while True:
            try:
                batches = await client.xread({key: last}, count=READ_COUNT, block=READ_BLOCK_MS)
            except aredis.RedisError as exc:
                log.warning("notification stream %s: %s", key, exc)
                await asyncio.sleep(1)
                continue
            for _, entries in batches or []:
                for nid, fields in entries:
                    last = nid.decode()
                    await self.send(
                        {
                            "op": "notify",
                            "actor": str(name),
                            "nid": last,
                            "data": codec.unpack(fields[b"d"]),
                        }
                    )


def _id_of(raw: Any) -> Any:
    return raw.get("id") if isinstance(raw, dict) else None
