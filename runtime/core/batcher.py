"""Group round trips: the Redis work of every actor that asked during one turn of the
event loop travels in one round trip.

Commits, checkpoint loads, reply look-ups and lease checks all go through one
:class:`Batcher`. A request appends its commands (tuples of arguments) to a list;
the batcher flushes on the next loop turn, so a lone actor pays one round trip and
ten thousand busy actors share a few. At most ``concurrency`` round trips are in
flight; requests that arrive meanwhile wait for the next one. Each request's
commands stay together and in order, and every request learns only its own
replies (an error reply is handed back as a value, so one refused script never
fails its neighbours).

This is the engine's hot path, so it speaks to Redis through redis-py's connection
API directly: the commands are packed by hiredis in one buffer, written at once and
their replies read in order, with one deadline (``timeout``) for the whole round
trip. A round trip that misses it, or fails, closes its connection, so no late reply
can ever be read as another request's. A connection that just finished a round trip
is kept for the next (used again within ``REUSE_SECONDS``), without going through
the pool, whose checks (a lock, a read attempt, metrics) cost about as much as
reading the replies; an older one goes back to the pool, which checks it.

Lua scripts are sent as ``EVALSHA`` (:class:`Script`). After a ``NOSCRIPT`` (a
restarted or flushed Redis) the script is loaded again and only the requests that
hit it are re-sent; a ``NOSCRIPT`` reply means the script did not run, so re-sending
is safe.

On Redis Cluster the batch is split by the master that owns each command's slot and
the parts travel at once, one round trip per master. Commands of one slot keep their
order; a request's commands on different slots are not ordered with each other
(none of troth's requests needs it: what must be atomic is one script on one slot).

With ``wait_replicas`` (``redis.wait_replicas``) every round trip ends with a
``WAIT``: its replies are handed out only once that many replicas have its writes,
so an acknowledged commit survives the loss of the master (see the README's
"What a failover can lose"); otherwise its requests fail as if Redis had not
answered, and callers retry under the same request id.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeout

from troth.core.aio import Background
from troth.core.redis_clients import AsyncClient
from troth.core.scripts import Script

log = logging.getLogger(__name__)

Command = tuple[Any, ...]
Queue = Callable[[list[Command]], None]  # appends a request's commands


@dataclass(eq=False, slots=True)
class _Request:
    add: Queue
    count: int
    future: asyncio.Future[list[Any]]
    scripts: tuple[Script, ...] = field(default=())


#: A connection that finished a round trip this recently is used again unchecked.
REUSE_SECONDS = 1.0
#: Redirections (MOVED, ASK, TRYAGAIN) one command follows within a round trip.
MAX_REDIRECTS = 5
#: The slot map is read again at most this often after a cluster master failed.
REFRESH_SECONDS = 0.5


class NotReplicated(RedisError):  # type: ignore[misc]  # redis-py is untyped here
    """Fewer replicas than ``wait_replicas`` acknowledged a round trip's writes in
    time: they ran on the master, but a failover could still lose them."""


@dataclass(frozen=True, slots=True)
class Lost:
    """In place of a reply: the command went to a cluster master that failed before
    answering, so whether it ran is unknown (the request fails with ``error``)."""

    error: Exception


class _Endpoint:
    """The connections to one server: the pool of a single Redis, or those redis-py's
    cluster client keeps for one master. A connection that just finished a round trip
    is used again without the pool's checks; one idle for over ``REUSE_SECONDS`` goes
    back to the pool, which checks it."""

    def __init__(self, source: ConnectionPool | ClusterNode) -> None:
        self.pool = source if isinstance(source, ConnectionPool) else None
        self.node = source if isinstance(source, ClusterNode) else None
        self._idle: list[tuple[Any, float]] = []  # (connection, when it was last used)

    async def _acquire(self) -> Any:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn, used = self._idle.pop()
            if now - used < REUSE_SECONDS:
                return conn
            await self._release(conn)
        if self.node is not None:
            return self.node.acquire_connection()
        assert self.pool is not None
        return await self.pool.get_connection()

    async def _release(self, conn: Any) -> None:
        if self.node is not None:
            self.node.release(conn)
        else:
            assert self.pool is not None
            await self.pool.release(conn)

    async def round_trip(
        self, commands: list[Command], timeout: float, wait_replicas: int = 0
    ) -> list[Any]:
        """Write ``commands`` at once and read their replies in order, within
        ``timeout``; an error reply is returned as its exception. A failure or a missed
        deadline closes the connection, so no late reply is ever read as another's.

        With ``wait_replicas``, a ``WAIT`` follows the commands: the replies are
        returned only once that many replicas have the writes, else
        :class:`NotReplicated` is raised (the writes' fate is then unknown)."""
        if wait_replicas:
            # WAIT blocks the connection: give it half the round trip's time.
            commands = [*commands, ("WAIT", wait_replicas, max(1, int(timeout * 500)))]
        packed = b"".join(hiredis.pack_command(c) for c in commands)
        conn = await self._acquire()
        try:
            async with asyncio.timeout(timeout):
                await conn.send_packed_command(packed, check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        # The round trip as a whole is bounded above: no timer a reply
                        # (redis-py's own per-read timeout more than doubles its cost).
                        replies.append(await conn.read_response(timeout=math.inf))
                    except ResponseError as exc:  # a reply, not a broken connection
                        replies.append(exc)
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            await self._release(conn)
            if isinstance(exc, TimeoutError):
                raise RedisTimeout(f"Redis did not answer within {timeout}s") from None
            raise
        self._idle.append((conn, asyncio.get_running_loop().time()))
        if wait_replicas:
            acked = replies.pop()
            if isinstance(acked, Exception) and all(isinstance(r, AskError) for r in replies):
                return replies  # a replica now (WAIT refused): nothing ran, follow MOVED
            if isinstance(acked, Exception) or acked < wait_replicas:
                raise NotReplicated(
                    f"{acked} of {wait_replicas} replicas acknowledged the writes in time"
                )
        return replies


def _redirect(reply: Any) -> str | None:
    """The cluster reply that sent a command elsewhere or later, by name."""
    for cls, name in (
        (MovedError, "MOVED"),
        (AskError, "ASK"),
        (TryAgainError, "TRYAGAIN"),
        (ClusterDownError, "CLUSTERDOWN"),
    ):
        if isinstance(reply, cls):
            return name
    return None


def _slot(command: Command) -> int:
    """The slot a command is routed by: that of a script's first key, of a stream
    read's first stream, else of its first argument (every command batched names one
    key, or keys of one slot)."""
    name = command[0]
    if name == "EVALSHA":
        key = command[3]
    elif name == "XREAD":
        key = command[command.index("STREAMS") + 1]
    else:
        key = command[1]
    return int(key_slot(key if isinstance(key, bytes) else str(key).encode()))


async def _refresh_slots(cluster: AsyncRedisCluster, failed: str) -> None:
    try:
        await cluster.nodes_manager.initialize(last_failed_node_name=failed)
    except Exception as exc:  # the next failure tries again
        log.warning("reading the Redis Cluster slot map failed: %s", exc)


class Batcher:
    def __init__(
        self,
        client: AsyncClient,
        batch_max: int = 256,
        concurrency: int = 4,
        timeout: float = 5.0,
        wait_replicas: int = 0,
        on_redirect: Callable[[str], None] | None = None,
    ) -> None:
        """``on_redirect(reply)`` counts the cluster replies that sent a command
        elsewhere or later (``MOVED``, ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``)."""
        self.client = client
        self.wait_replicas = wait_replicas
        self.on_redirect = on_redirect
        #: On Redis Cluster, commands are routed by key slot; else all go to one server.
        self._cluster = client if isinstance(client, AsyncRedisCluster) else None
        self._single = None if self._cluster is not None else _Endpoint(client.connection_pool)
        self._endpoints: dict[str, _Endpoint] = {}  # cluster node name -> its connections
        self._refreshed = -math.inf
        self.timeout = timeout
        self.batch_max = batch_max
        self.concurrency = concurrency
        self._pending: deque[_Request] = deque()
        self._inflight = 0
        self._scheduled = False
        self._background = Background()

    def submit(self, add: Queue, count: int = 1, *scripts: Script) -> asyncio.Future[list[Any]]:
        """Queue ``count`` commands (added by ``add``); the future of their results.

        ``scripts`` names the Lua scripts ``add`` calls, to be reloaded on NOSCRIPT.
        Redis errors of the round trip itself (connection, timeout) are the future's.
        (A future, not a coroutine: the engine's commit awaits it with one coroutine
        frame less held a message.)
        """
        loop = asyncio.get_running_loop()
        request = _Request(add, count, loop.create_future(), scripts)
        self._pending.append(request)
        if not self._scheduled and self._inflight < self.concurrency:
            self._scheduled = True
            loop.call_soon(self._flush)
        return request.future

    async def run(self, add: Queue, count: int = 1, *scripts: Script) -> list[Any]:
        """:meth:`submit`, awaited."""
        return await self.submit(add, count, *scripts)

    async def results(self, add: Queue, count: int = 1, *scripts: Script) -> list[Any]:
        """:meth:`run`, raising the first error reply (a refused command) instead of
        returning it, for requests whose commands all must succeed."""
        replies = await self.run(add, count, *scripts)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending and self._inflight < self.concurrency:
            batch: list[_Request] = []
            commands = 0
            while self._pending and (not batch or commands < self.batch_max):
                request = self._pending.popleft()
                batch.append(request)
                commands += request.count
            self._inflight += 1
            self._background.spawn(self._send(batch))

    async def _send(self, batch: list[_Request]) -> None:
        try:
            await self._execute(batch)
        finally:
            self._inflight -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _execute(self, batch: list[_Request], reloaded: bool = False) -> None:
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        commands: list[Command] = []
        for request in live:
            request.add(commands)
        try:
            results = await self._round_trip(commands)
        except Exception as exc:  # nothing is known of any of them
            for request in live:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        retry: list[_Request] = []
        offset = 0
        for request in live:
            mine = results[offset : offset + request.count]
            offset += request.count
            lost = next((r for r in mine if isinstance(r, Lost)), None)
            if lost is not None:  # a cluster master failed: nothing is known of these
                if not request.future.done():
                    request.future.set_exception(lost.error)
            elif (
                not reloaded and request.scripts and any(isinstance(r, NoScriptError) for r in mine)
            ):
                retry.append(request)
            elif not request.future.done():
                request.future.set_result(mine)
        if retry:
            try:
                await self._reload({s for r in retry for s in r.scripts})
            except Exception as exc:
                for request in retry:
                    request.future.set_exception(exc)
                return
            await self._execute(retry, reloaded=True)

    async def _round_trip(self, commands: list[Command]) -> list[Any]:
        if self._single is not None:
            return await self._single.round_trip(commands, self.timeout, self.wait_replicas)
        assert self._cluster is not None
        return await self._cluster_round_trip(self._cluster, commands)

    async def _cluster_round_trip(
        self, cluster: AsyncRedisCluster, commands: list[Command]
    ) -> list[Any]:
        """Send each command to the master that owns its key's slot, one round trip per
        master, all at once. A ``MOVED`` (the slot has a new master: a failover, a
        resharding) or ``ASK`` (the key is being migrated) reply means the command did
        not run: it is sent again where Redis says, as are ``TRYAGAIN`` and
        ``CLUSTERDOWN`` replies (a slot in the middle of a failover) after a short
        wait, within the round trip's deadline. A master that cannot be reached makes
        its commands :class:`Lost` (nothing is known of them) and the slot map is
        read again."""
        await cluster.initialize()
        manager = cluster.nodes_manager
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        replies: list[Any] = [None] * len(commands)
        asking: dict[int, tuple[str, int]] = {}
        todo = list(range(len(commands)))
        for attempt in range(MAX_REDIRECTS + 1):
            groups: dict[str, tuple[ClusterNode, list[int]]] = {}
            for i in todo:
                if i in asking:
                    host, port = asking[i]
                    node = manager.get_node(host=host, port=port) or ClusterNode(
                        host, port, **manager.connection_kwargs
                    )
                else:
                    node = manager.get_node_from_slot(_slot(commands[i]))
                groups.setdefault(node.name, (node, []))[1].append(i)
            sends = []
            for node, indices in groups.values():
                sent: list[Command] = []
                for i in indices:
                    if i in asking:
                        sent.append(("ASKING",))
                    sent.append(commands[i])
                sends.append(
                    self._endpoint(node).round_trip(sent, self.timeout, self.wait_replicas)
                )
            results = await asyncio.gather(*sends, return_exceptions=True)
            again: list[int] = []
            wait = False
            for (node, indices), result in zip(groups.values(), results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result
                    for i in indices:
                        replies[i] = Lost(result)
                    if not isinstance(result, NotReplicated):
                        self._refresh(cluster, node)
                    continue
                it = iter(result)
                for i in indices:
                    if i in asking:
                        next(it)  # the ASKING's OK
                        del asking[i]
                    reply = next(it)
                    replies[i] = reply
                    kind = _redirect(reply)
                    if kind is None:
                        continue
                    if self.on_redirect is not None:
                        self.on_redirect(kind)
                    again.append(i)
                    if kind == "MOVED":
                        await manager.move_slot(reply)
                    elif kind == "ASK":
                        asking[i] = (reply.host, int(reply.port))
                    else:  # TRYAGAIN, CLUSTERDOWN: the same place, a little later
                        wait = True
            if not again or loop.time() >= deadline:
                break
            todo = again
            if wait:
                await asyncio.sleep(min(0.05 * (attempt + 1), max(0.0, deadline - loop.time())))
        return replies

    def _endpoint(self, node: ClusterNode) -> _Endpoint:
        endpoint = self._endpoints.get(node.name)
        if endpoint is None or endpoint.node is not node:
            endpoint = self._endpoints[node.name] = _Endpoint(node)
        return endpoint

    def _refresh(self, cluster: AsyncRedisCluster, failed: ClusterNode) -> None:
        """Read the slot map again (at most twice a second), after a master failed."""
        now = asyncio.get_running_loop().time()
        if now - self._refreshed < REFRESH_SECONDS:
            return
        self._refreshed = now
        log.warning("Redis Cluster node %s failed; reading the slot map again", failed.name)
        self._background.spawn(_refresh_slots(cluster, failed.name))

    async def _reload(self, scripts: set[Script]) -> None:
        for script in scripts:
            log.info("loading Lua script %s", script.sha)
            await self.client.script_load(script.source)
