"""``/v1/admin``: what the console (``/ui``) and scripts read and change as operators.

Every endpoint needs an operator (``auth.operators``; without API keys, the loopback
caller is one): any operator reads, only a ``write`` operator changes. Reads go
straight to Redis (:mod:`troth.edge.admin`), so they show every node's shards and
actors, not only this node's. Changes keep the runtime's guarantees: an outbox
entry is re-driven or purged by compare-and-set and its shard's owner is told; an
actor is deleted by its own last transaction, on the node that owns it; a drain is
a flag the node acts on at its next heartbeat.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from troth.core.access import DELETE_ACTOR, SYSTEM
from troth.core.errors import NotFoundError
from troth.core.names import ActorName
from troth.edge import admin
from troth.edge.http_api import ReadOperator, WriteOperator, body_schema, json_body

if TYPE_CHECKING:
    from troth.node import Node


class EntryRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=400, description="The outbox entry's id.")


class DrainOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    undo: bool = Field(False, description="Take the node's share of shards again.")
    force: bool = Field(False, description="Even the last live node that serves.")


def admin_router(node: Node) -> APIRouter:
    api = APIRouter(prefix="/v1/admin", tags=["operators"])
    client, keys = node.client, node.keys

    def off_loop(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return asyncio.to_thread(fn, client, keys, *args, **kwargs)

    @api.get("/me", summary="What this operator may do: read, or write")
    async def me(role: ReadOperator) -> dict[str, Any]:
        return {"role": role, "node": node.node_id}

    @api.get("/status", summary="Nodes, shards, backlogs and recent failures (troth status)")
    async def status(_: ReadOperator) -> dict[str, Any]:
        data: dict[str, Any] = await off_loop(admin.status, node.extensions)
        data["node"] = node.node_id
        return data

    @api.get("/shards", summary="Every shard's owner and fencing epoch")
    async def shards(_: ReadOperator) -> dict[str, Any]:
        return {"shards": await off_loop(admin.shard_table)}

    @api.get("/types", summary="The actor types this node hosts")
    async def types(_: ReadOperator) -> dict[str, Any]:
        return {
            "types": [
                {
                    "name": t.name,
                    "class": f"{t.cls.__module__}:{t.cls.__qualname__}",
                    "state_version": t.state_version,
                    "autonomous": t.autonomous,
                    "methods": sorted(t.methods),
                }
                for t in sorted(node.catalog, key=lambda t: t.name)
            ]
        }

    @api.get("/actors", summary="Actors with a checkpoint, by type, a page at a time")
    async def actors(
        _: ReadOperator,
        type: str | None = Query(None, pattern=r"^[a-z][a-z0-9_]{0,63}$"),
        cursor: str | None = Query(None, max_length=40),
        limit: int = Query(100, ge=1, le=admin.MAX_LIST),
    ) -> dict[str, Any]:
        names, nxt = await off_loop(admin.list_actors, type, cursor, limit)
        return {"items": names, "next_cursor": nxt}

    @api.get("/actors/{actor_type}/{actor_id}", summary="An actor's checkpoint, timers, outbox")
    async def inspect(actor_type: str, actor_id: str, _: ReadOperator) -> dict[str, Any]:
        name = ActorName.of(actor_type, actor_id)
        data: dict[str, Any] | None = await off_loop(admin.inspect, name)
        if data is None:
            raise NotFoundError(f"{name} has no checkpoint")
        return data

    @api.delete(
        "/actors/{actor_type}/{actor_id}",
        summary="Delete an actor: its last transaction removes every key it owns",
    )
    async def delete(actor_type: str, actor_id: str, _: WriteOperator) -> dict[str, Any]:
        name = ActorName.of(actor_type, actor_id)
        deleted = await node.router.call(
            name, DELETE_ACTOR, [], {}, None, SYSTEM, reply_cache=False
        )
        if not deleted:
            raise NotFoundError(f"{name} has no checkpoint")
        return {"deleted": str(name)}

    @api.get("/outbox", summary="Dead and uncertain outbox entries, newest first")
    async def outbox(
        _: ReadOperator,
        actor: str | None = Query(None, max_length=300, description="TYPE/ID: only its entries"),
        limit: int = Query(100, ge=1, le=admin.MAX_LIST),
    ) -> dict[str, Any]:
        origin = ActorName.parse(actor) if actor else None
        return {"items": await off_loop(admin.failed_entries, None, origin, limit)}

    def entry_change(path: str, change: Any, summary: str) -> None:
        """``POST /outbox/PATH {"id": ...}``: one operator change to one ledger entry."""

        async def endpoint(request: Request, _: WriteOperator) -> dict[str, Any]:
            ref = await json_body(request, EntryRef)
            result: dict[str, Any] = await off_loop(change, ref.id)
            return result

        api.post(f"/outbox/{path}", openapi_extra=body_schema(EntryRef), summary=summary)(endpoint)

    entry_change("redrive", admin.redrive, "Attempt a dead or uncertain entry again")
    entry_change("purge", admin.purge, "Forget a dead or uncertain entry")

    @api.post(
        "/nodes/{node_id}/drain",
        openapi_extra=body_schema(DrainOrder),
        summary="Hand a node's shards off (or undo)",
    )
    async def drain(node_id: str, request: Request, _: WriteOperator) -> dict[str, Any]:
        order = await json_body(request, DrainOrder)
        result: dict[str, Any] = await off_loop(admin.drain, node_id, order.undo, order.force)
        return result

    return api
