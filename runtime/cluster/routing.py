"""Location-independent calls: any node accepts any call and routes it to the owner.

The routing table is the lease manager's snapshot of shard owners and node URLs,
at most one heartbeat old. A call for a shard this node owns runs here; any other
call is forwarded once, over HTTP, to the owner's ``/v1/cluster/call`` endpoint.

**Forwarding is signed.** The forwarded body names the actor, the method, the
arguments, the request id and the :class:`~troth.core.access.Caller` (principal, sending
actor, internal flag) exactly as the entry node authenticated them, and the header
``x-troth-cluster`` carries an HMAC-SHA256 of that body under the cluster secret.
No URL is built from names, and the owner re-applies the access rule to the
original caller, so a node never takes another's word for more than the body says.

**Retries.** Whatever makes a call fail without running (the owner is dead or
unreachable, the shard is moving, the stale owner was fenced) surfaces as a
:class:`RetryableError`; the router then re-reads the owner from Redis and tries
again, with backoff, until the call's deadline. Every call carries a
``request_id`` (one is assigned at the entry node when the client gave none), and
the owner's committed-reply cache answers a repeated id without running it again:
a call that races with a handoff or a crash is **never lost and never applied
twice**. When Redis itself does not answer, the router does not wait for it: the
caller gets :class:`RedisUnavailable` (503) at once and retries under the same id.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import redis
from pydantic import BaseModel, ConfigDict, Field

from troth.core.access import Caller, check_access
from troth.core.errors import (
    CallTimeout,
    RedisUnavailable,
    RetryableError,
    UnavailableError,
    error_from_dict,
)
from troth.core.names import ActorName, check_method, shard_of

if TYPE_CHECKING:
    from troth.cluster.leases import LeaseManager
    from troth.core.catalog import Catalog
    from troth.engine.engine import Engine

#: The header that carries the HMAC of a forwarded call's body.
CLUSTER_HEADER = "x-troth-cluster"
#: The endpoint of the owner that takes forwarded calls.
CLUSTER_PATH = "/v1/cluster/call"
#: A forwarded body older than this (or this far in the future) is refused: a
#: captured request cannot be replayed later.
MAX_FORWARD_AGE_MS = 300_000
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0


class ForwardedCall(BaseModel):
    """The body of a node-to-node call; signed as a whole (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    actor: str = Field(max_length=300)
    method: str = Field(max_length=100)
    args: list[Any]
    kwargs: dict[str, Any]
    request_id: str | None = Field(None, min_length=1, max_length=200)
    principal: str | None = Field(None, max_length=64)
    sender: str | None = Field(None, max_length=300)
    internal: bool = False
    sent_ms: int
    timeout: float = Field(gt=0, le=3600)
    #: The entry node made ``request_id`` for this very attempt (no replay look-up).
    new_id: bool = False

    @property
    def caller(self) -> Caller:
        return Caller(self.principal, actor=self.sender, internal=self.internal)


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Router:
    """Routes calls by the leases' routing table; runs owned calls on ``engine``."""

    def __init__(
        self,
        catalog: Catalog,
        engine: Engine,
        leases: LeaseManager,
        call_timeout: float,
        secret: str = "",
    ) -> None:
        self.catalog = catalog
        self.engine = engine
        self.leases = leases
        self.node_id = leases.node_id
        self.call_timeout = call_timeout
        self.secret = secret
        self._http: aiohttp.ClientSession | None = None

    def verify(self, body: bytes, signature: str | None) -> ForwardedCall | None:
        """The forwarded call in ``body`` if ``signature`` is its HMAC and it is fresh."""
        if not signature or not self.secret:
            return None
        if not hmac.compare_digest(signature, sign(self.secret, body)):
            return None
        call = ForwardedCall.model_validate_json(body)
        if abs(int(time.time() * 1000) - call.sent_ms) > MAX_FORWARD_AGE_MS:
            return None
        return call

    async def call(
        self,
        name: ActorName,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        request_id: str | None,
        caller: Caller,
        *,
        forwarded: bool = False,
        timeout: float | None = None,
        new_id: bool = False,
        reply_cache: bool = True,
        fresh: bool = False,
    ) -> Any:
        """Run the call on the owner of the actor's shard; see the module docstring.

        The access rule is applied here, at the entry, before anything is forwarded,
        and again by the owner's engine. ``reply_cache=False`` (for methods that are
        idempotent by themselves) sends a call with no ``request_id`` as it is: its
        reply is not kept, and a retry may run it again. ``fresh`` says the actor is
        new (a name just made up from a random id): see :meth:`Engine.call`.
        """
        leases = self.leases
        check_method(method)
        atype = self.catalog.get(name.type)
        check_access(caller, name, method, atype.methods, atype.internal_methods)
        # An id made here is new on the first attempt: no committed reply can exist for
        # it, so the owner skips the replay look-up (one Redis read less per call).
        if request_id is None and reply_cache:
            new_id, request_id = True, f"rt-{os.urandom(16).hex()}"
        total = timeout or self.call_timeout
        deadline = time.monotonic() + total
        shard = shard_of(name, leases.keys.shard_count)
        backoff = BACKOFF_START
        while True:
            remaining = deadline - time.monotonic()
            try:
                owner = leases.owner_of(shard)
                if owner == self.node_id:
                    async with asyncio.timeout(remaining):  # no task of its own, as wait_for
                        return await self.engine.call(
                            name,
                            method,
                            args,
                            kwargs,
                            request_id,
                            caller,
                            new_id=new_id,
                            fresh=fresh,
                        )
                if forwarded:
                    raise UnavailableError(f"{name}: shard {shard} is not on {self.node_id}")
                url = leases.urls.get(owner)
                if not url:
                    raise UnavailableError(f"{name}: shard {shard} has no live owner yet")
                call = ForwardedCall(
                    actor=str(name),
                    method=method,
                    args=args,
                    kwargs=kwargs,
                    request_id=request_id,
                    principal=caller.principal,
                    sender=caller.actor,
                    internal=caller.internal,
                    sent_ms=int(time.time() * 1000),
                    timeout=max(0.1, remaining),
                    new_id=new_id,
                )
                return await self._forward(url, call)
            except RedisUnavailable:
                raise
            except RetryableError:
                if forwarded or time.monotonic() + backoff >= deadline:
                    raise
            except TimeoutError:
                raise CallTimeout(f"{name}.{method}: no reply in time") from None
            new_id = fresh = False  # a retry may follow an attempt whose commit went through
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)
            try:
                await asyncio.to_thread(leases.refresh_owner, shard)
            except redis.RedisError as exc:
                raise RedisUnavailable(f"{name}: Redis unavailable: {exc}") from None

    async def _forward(self, url: str, call: ForwardedCall) -> Any:
        # aiohttp, as for webhooks: httpx's pool slows down with many connections
        # (docs/design.md, *Execution*).
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256), trust_env=False
            )
        body = json.dumps(call.model_dump(mode="json"), separators=(",", ":")).encode()
        headers = {CLUSTER_HEADER: sign(self.secret, body), "content-type": "application/json"}
        try:
            async with self._http.post(
                f"{url}{CLUSTER_PATH}",
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=call.timeout),
                allow_redirects=False,
            ) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UnavailableError(f"owner at {url} unreachable: {exc!r}") from exc
        try:
            data = json.loads(raw)
        except ValueError:
            raise UnavailableError(f"owner at {url} answered {status}") from None
        if status == 200:
            return data["result"]
        raise error_from_dict(data.get("error", {}), status)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
