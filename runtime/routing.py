"""Location-independent calls: any node accepts any call and routes it to the owner.

The routing table is the lease manager's snapshot of shard owners and node URLs,
at most one heartbeat old. A call for a shard this node owns runs here; any other
call is forwarded once, over HTTP, to the owner, marked with the cluster secret so
that the owner trusts the entry node's authentication and never forwards again.

**Retries.** Whatever makes a call fail without running (the owner is dead or
unreachable, the shard is moving, the stale owner was fenced) surfaces as a
:class:`RetryableError`; the router then re-reads the owner from Redis and tries
again, with backoff, until the call's deadline. Every call carries a
``request_id`` (one is assigned at the entry node when the client gave none), and
the owner's committed-reply cache answers a repeated id without running it again:
a call that races with a handoff or a crash is **never lost and never applied
twice**.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx

from .errors import CallTimeout, RetryableError, UnavailableError, error_from_dict
from .names import ActorName, shard_of

if TYPE_CHECKING:
    from .node import Node

#: The header that carries the cluster secret on node-to-node calls.
CLUSTER_HEADER = "x-troth-cluster"
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0


class Router:
    def __init__(self, node: Node, secret: str) -> None:
        self.node = node
        self.secret = secret
        self._http: httpx.AsyncClient | None = None

    def is_cluster_call(self, header: str | None) -> bool:
        return header is not None and hmac.compare_digest(header, self.secret)

    async def call(
        self,
        name: ActorName,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        request_id: str | None = None,
        *,
        forwarded: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Run the call on the owner of the actor's shard; see the module docstring."""
        node = self.node
        request_id = request_id or f"rt-{uuid.uuid4().hex}"
        deadline = time.monotonic() + (timeout or node.config.node.call_timeout_seconds)
        shard = shard_of(name, node.keys.shard_count)
        backoff = BACKOFF_START
        while True:
            remaining = deadline - time.monotonic()
            try:
                owner = node.leases.owner_of(shard)
                if owner == node.node_id:
                    fut = node.call(name, method, args, kwargs, request_id)
                    return await asyncio.wait_for(asyncio.wrap_future(fut), remaining)
                if forwarded:
                    raise UnavailableError(f"{name}: shard {shard} is not on {node.node_id}")
                url = node.leases.urls.get(owner)
                if not url:
                    raise UnavailableError(f"{name}: shard {shard} has no live owner yet")
                return await node.io.run(
                    self._forward(url, name, method, args, kwargs, request_id, remaining)
                )
            except RetryableError:
                if forwarded or time.monotonic() + backoff >= deadline:
                    raise
            except TimeoutError:
                raise CallTimeout(f"{name}.{method}: no reply in time") from None
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)
            await asyncio.to_thread(node.leases.refresh_owner, shard)

    async def _forward(
        self,
        url: str,
        name: ActorName,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        request_id: str,
        timeout: float,
    ) -> Any:
        if self._http is None:
            self._http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)
            )
        try:
            resp = await self._http.post(
                f"{url}/v1/actors/{name.type}/{name.id}/{method}",
                json={"args": args, "kwargs": kwargs, "request_id": request_id},
                headers={CLUSTER_HEADER: self.secret},
                timeout=max(0.1, timeout),
            )
        except httpx.HTTPError as exc:
            raise UnavailableError(f"owner at {url} unreachable: {exc!r}") from exc
        try:
            body = resp.json()
        except ValueError:
            raise UnavailableError(f"owner at {url} answered {resp.status_code}") from None
        if resp.status_code == 200:
            return body["result"]
        raise error_from_dict(body.get("error", {}), resp.status_code)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
