"""Location-independent calls: any node accepts any call and routes it to the owner.

The routing table is the lease manager's snapshot of shard owners and node URLs,
at most one heartbeat old. A call for a shard this node owns runs here; any other
call is forwarded once, over HTTP, to the owner's ``/v1/cluster/call`` endpoint.

**Forwarding may be batched.** Calls made ``together`` (the creations of one batch
request) that a loop turn forwards to one owner travel in one request to
``/v1/cluster/calls``, up to ``MAX_FORWARD_BATCH`` calls and the body limit; each
gets its own result or error, as if sent alone, once the slowest of them is done
(so only calls of one request go together: a slow call never holds up a stranger's).
A call alone, any call while tracing is on (its span travels in its request's
headers) and every call to a node that does not know the batch endpoint (a rolling
upgrade) go one a request.

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
import itertools
import json
import os
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from troth.core import tracing
from troth.core.access import Caller, check_access
from troth.core.aio import Background
from troth.core.errors import (
    CallTimeout,
    RedisUnavailable,
    RetryableError,
    TrothError,
    UnavailableError,
    error_from_dict,
)
from troth.core.http1 import Http1Client, resolve_any
from troth.core.names import ActorName, check_method, shard_of

if TYPE_CHECKING:
    from troth.cluster.leases import LeaseManager
    from troth.core.catalog import Catalog
    from troth.engine.engine import Engine

#: The header that carries the HMAC of a forwarded call's body.
CLUSTER_HEADER = "x-troth-cluster"
#: The endpoint of the owner that takes forwarded calls.
CLUSTER_PATH = "/v1/cluster/call"
#: The same for several calls in one request.
CLUSTER_BATCH_PATH = "/v1/cluster/calls"
#: The largest answer read from another node: no bound a reply could reach, only a
#: guard against a broken peer.
MAX_ANSWER_BYTES = 256 * 1024 * 1024
#: How long a connection to another node stays open unused.
KEEP_IDLE_SECONDS = 4.0
#: At most this many calls travel in one forwarded request.
MAX_FORWARD_BATCH = 100
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


class ForwardedBatch(BaseModel):
    """The body of several forwarded calls to one owner; signed as a whole."""

    model_config = ConfigDict(extra="forbid")

    calls: list[ForwardedCall] = Field(min_length=1, max_length=MAX_FORWARD_BATCH)


#: A call waiting to be forwarded: its JSON body, its timeout and its caller's future.
_Queued = tuple[bytes, float, "asyncio.Future[Any]"]


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _fresh(call: ForwardedCall) -> bool:
    """Sent within ``MAX_FORWARD_AGE_MS`` of now: a captured body cannot be replayed."""
    return abs(int(time.time() * 1000) - call.sent_ms) <= MAX_FORWARD_AGE_MS


class Router:
    """Routes calls by the leases' routing table; runs owned calls on ``engine``."""

    def __init__(
        self,
        catalog: Catalog,
        engine: Engine,
        leases: LeaseManager,
        call_timeout: float,
        secret: str = "",
        max_batch_bytes: int = 1_048_576,
    ) -> None:
        self.catalog = catalog
        self.engine = engine
        self.leases = leases
        self.node_id = leases.node_id
        self.call_timeout = call_timeout
        self.secret = secret
        #: The largest batch body (the owner's body limit is the same setting).
        self.max_batch_bytes = max_batch_bytes
        self._http = Http1Client(
            resolve_any,
            timeout=call_timeout,
            user_agent="troth-node",
            max_response_bytes=MAX_ANSWER_BYTES,
            # below the nodes' default keep-alive (5 s): the owner rarely closes a
            # connection just as a call goes out on it (a call is never sent twice)
            idle_seconds=KEEP_IDLE_SECONDS,
        )
        # Request ids this router makes up: a random prefix for this process (unique
        # across nodes and restarts) and a counter, instead of random bytes a call.
        self._ids = itertools.count()
        self._id_prefix = f"rt-{os.urandom(12).hex()}-"
        self._queued: dict[str, list[_Queued]] = {}  # by owner URL, for this loop turn
        self._single_only: set[str] = set()  # owners without the batch endpoint
        self._sending = Background()

    def verify(self, body: bytes, signature: str | None) -> ForwardedCall | None:
        """The forwarded call in ``body`` if ``signature`` is its HMAC and it is fresh."""
        if not self._signed(body, signature):
            return None
        try:
            call = ForwardedCall.model_validate_json(body)
        except ValidationError:
            return None
        return call if _fresh(call) else None

    def verify_batch(self, body: bytes, signature: str | None) -> ForwardedBatch | None:
        """The forwarded calls in ``body`` if ``signature`` is its HMAC and every one of
        them is fresh."""
        if not self._signed(body, signature):
            return None
        try:
            batch = ForwardedBatch.model_validate_json(body)
        except ValidationError:
            return None
        return batch if all(_fresh(call) for call in batch.calls) else None

    def _signed(self, body: bytes, signature: str | None) -> bool:
        return bool(
            signature and self.secret and hmac.compare_digest(signature, sign(self.secret, body))
        )

    async def run_forwarded(self, call: ForwardedCall) -> Any:
        """Run a call another node forwarded, here or not at all."""
        return await self.call(
            ActorName.parse(call.actor),
            call.method,
            call.args,
            call.kwargs,
            call.request_id,
            call.caller,
            forwarded=True,
            timeout=call.timeout,
            new_id=call.new_id,
            reply_cache=call.request_id is not None,
        )

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
        together: bool = False,
    ) -> Any:
        """Run the call on the owner of the actor's shard; see the module docstring.

        The access rule is applied here, at the entry, before anything is forwarded,
        and again by the owner's engine. ``reply_cache=False`` (for methods that are
        idempotent by themselves) sends a call with no ``request_id`` as it is: its
        reply is not kept, and a retry may run it again. ``fresh`` says the actor is
        new (a name just made up from a random id): see :meth:`Engine.call`.
        ``together`` lets a forwarded call share a request (see the module docstring).
        """
        leases = self.leases
        check_method(method)
        atype = self.catalog.get(name.type)
        check_access(caller, name, method, atype.methods, atype.internal_methods)
        # An id made here is new on the first attempt: no committed reply can exist for
        # it, so the owner skips the replay look-up (one Redis read less per call).
        if request_id is None and reply_cache:
            new_id, request_id = True, f"{self._id_prefix}{next(self._ids)}"
        total = timeout or self.call_timeout
        deadline = time.monotonic() + total
        shard = shard_of(name, leases.keys.shard_count)
        backoff = BACKOFF_START
        while True:
            remaining = deadline - time.monotonic()
            try:
                owner = leases.owner_of(shard)
                if owner == self.node_id:
                    reply = self.engine.call(
                        name, method, args, kwargs, request_id, caller, new_id=new_id, fresh=fresh
                    )
                    # A timer that fails the reply (the call runs on regardless, as
                    # after any timeout): no task of its own, as with wait_for, and
                    # about a third of asyncio.timeout's cost.
                    expiry = asyncio.get_running_loop().call_later(remaining, _expire, reply)
                    try:
                        return await reply
                    finally:
                        expiry.cancel()
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
                return await self._forward(url, call, together)
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

    async def call_many(
        self,
        names: Sequence[ActorName],
        method: str,
        args: Sequence[list[Any]],
        caller: Caller,
        *,
        fresh: Sequence[bool],
    ) -> list[Any]:
        """:meth:`call` of ``method`` on every actor of ``names`` at once (``args[i]``
        and ``fresh[i]`` for the i-th), for a method that is idempotent by itself
        (``reply_cache=False``), the forwarded calls ``together``. Returns each call's
        reply, or the :class:`TrothError` it failed with, in order.

        Each call gets what :meth:`call` promises: the access rule, the deadline, and
        retries of a call that failed without running (its shard moved, its owner was
        fenced). What differs is the cost: a call to an actor of this node goes
        straight to the engine, with no coroutine of its own and one timer for all
        (a batch of creations spends about 5% less CPU an item)."""
        check_method(method)
        deadline = time.monotonic() + self.call_timeout
        outcomes: list[Any] = [None] * len(names)
        local: list[tuple[int, asyncio.Future[Any]]] = []
        others: list[asyncio.Future[Any]] = []  # (tasks) calls that take the long way
        routed: list[int] = []

        def route(i: int, fresh_one: bool) -> None:
            routed.append(i)
            timeout = max(0.1, deadline - time.monotonic())
            call = self.call(
                names[i],
                method,
                args[i],
                {},
                None,
                caller,
                timeout=timeout,
                reply_cache=False,
                fresh=fresh_one,
                together=True,
            )
            others.append(asyncio.ensure_future(call))

        shards = self.leases.keys.shard_count
        try:
            for i, name in enumerate(names):
                try:
                    atype = self.catalog.get(name.type)
                    check_access(caller, name, method, atype.methods, atype.internal_methods)
                    if self.leases.owner_of(shard_of(name, shards)) != self.node_id:
                        route(i, fresh[i])
                        continue
                    reply = self.engine.call(
                        name, method, args[i], {}, None, caller, fresh=fresh[i]
                    )
                    local.append((i, reply))
                except RetryableError:  # not served here after all
                    route(i, fresh[i])
                except TrothError as exc:
                    outcomes[i] = exc
            loop = asyncio.get_running_loop()
            expiry = loop.call_later(self.call_timeout, _expire_all, [f for _, f in local])
            try:
                for _, reply in local:  # (cheaper than a gather: most are done when reached)
                    try:  # noqa: SIM105 (contextlib.suppress costs a call an item)
                        await reply
                    except Exception:  # each outcome is read below
                        pass
            finally:
                expiry.cancel()
            for i, reply in local:
                error = reply.exception()
                if isinstance(error, RetryableError):
                    # Did not run; but its commit may have gone through (a Redis error
                    # during it): the long way, no longer fresh.
                    route(i, False)
                elif isinstance(error, TimeoutError):
                    outcomes[i] = CallTimeout(f"{names[i]}.{method}: no reply in time")
                else:
                    outcomes[i] = error if error is not None else reply.result()
            if others:
                results = await asyncio.gather(*others, return_exceptions=True)
                for i, result in zip(routed, results, strict=True):
                    outcomes[i] = result
        except BaseException:
            for task in others:  # (a cancellation: the calls under way go on unanswered)
                task.cancel()
            raise
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, TrothError):
                raise outcome  # a bug of ours, or a cancellation: not an answer
        return outcomes

    async def _forward(self, url: str, call: ForwardedCall, together: bool) -> Any:
        body = json.dumps(call.model_dump(mode="json"), separators=(",", ":")).encode()
        if not together or url in self._single_only or tracing.enabled():
            return await self._forward_one(url, body, call.timeout)
        loop = asyncio.get_running_loop()
        queued = self._queued.get(url)
        if queued is None:
            queued = self._queued[url] = []
            loop.call_soon(self._flush, url)
        done: asyncio.Future[Any] = loop.create_future()
        queued.append((body, call.timeout, done))
        async with asyncio.timeout(call.timeout):  # its own deadline, whatever the batch's
            return await done

    def _flush(self, url: str) -> None:
        """Send what this loop turn forwarded to ``url``, in batches within the limits."""
        batch: list[_Queued] = []
        size = 64  # the batch's own bytes around the calls, and some room
        for item in self._queued.pop(url, []):
            if batch and (
                len(batch) == MAX_FORWARD_BATCH or size + len(item[0]) > self.max_batch_bytes
            ):
                self._sending.spawn(self._send(url, batch))
                batch, size = [], 64
            batch.append(item)
            size += len(item[0]) + 1
        if batch:
            self._sending.spawn(self._send(url, batch))

    async def _send(self, url: str, batch: list[_Queued]) -> None:
        """Forward ``batch``; every caller's future is settled, whatever happens."""
        try:
            await self._send_batch(url, batch)
        finally:
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(UnavailableError(f"forwarding to {url} failed"))

    async def _send_batch(self, url: str, batch: list[_Queued]) -> None:
        if len(batch) == 1 or url in self._single_only:
            await asyncio.gather(
                *(self._settle(done, self._forward_one(url, b, t)) for b, t, done in batch)
            )
            return
        body = b'{"calls":[' + b",".join(b for b, _, _ in batch) + b"]}"
        try:
            status, data = await self._post(
                url + CLUSTER_BATCH_PATH, body, max(t for _, t, _ in batch)
            )
            if status == 404:  # an owner of an older version: one call a request
                self._single_only.add(url)
                await self._send_batch(url, batch)
                return
            if status != 200:
                raise error_from_dict(data.get("error", {}), status)
            results = data.get("results")
            if not isinstance(results, list) or len(results) != len(batch):
                raise UnavailableError(f"owner at {url} answered a batch of {len(batch)} wrongly")
        except TrothError as exc:
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, _, done), one in zip(batch, results, strict=True):
            if done.done():  # its caller gave up meanwhile
                continue
            if isinstance(one, dict) and "result" in one:
                done.set_result(one["result"])
            else:
                error = one.get("error", {}) if isinstance(one, dict) else {}
                status = one.get("status", 500) if isinstance(one, dict) else 500
                done.set_exception(error_from_dict(error, int(status)))

    @staticmethod
    async def _settle(done: asyncio.Future[Any], work: Awaitable[Any]) -> None:
        try:
            result = await work
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(result)

    async def _forward_one(self, url: str, body: bytes, timeout: float) -> Any:
        status, data = await self._post(url + CLUSTER_PATH, body, timeout)
        if status == 200:
            return data["result"]
        raise error_from_dict(data.get("error", {}), status)

    async def _post(self, url: str, body: bytes, timeout: float) -> tuple[int, dict[str, Any]]:
        """POST a signed body to another node: its status and JSON answer."""
        headers = {CLUSTER_HEADER: sign(self.secret, body), "content-type": "application/json"}
        try:
            resp = await self._http.request("POST", url, body, headers, timeout)
        except (OSError, TimeoutError) as exc:
            raise UnavailableError(f"owner at {url} unreachable: {exc!r}") from exc
        status, raw = resp.status_code, resp.body
        try:
            data = json.loads(raw)
        except ValueError:
            raise UnavailableError(f"owner at {url} answered {status}") from None
        if not isinstance(data, dict):
            raise UnavailableError(f"owner at {url} answered {status}")
        return status, data

    async def close(self) -> None:
        await asyncio.gather(*self._sending.pending(), return_exceptions=True)
        await self._http.aclose()


def _expire(reply: asyncio.Future[Any]) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError())


def _expire_all(replies: list[asyncio.Future[Any]]) -> None:
    for reply in replies:
        _expire(reply)
