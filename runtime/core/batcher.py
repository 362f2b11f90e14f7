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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.asyncio as aredis
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from troth.core.aio import Background

log = logging.getLogger(__name__)

Command = tuple[Any, ...]
Queue = Callable[[list[Command]], None]  # appends a request's commands


class Script:
    """A Lua script called by digest, loaded on demand."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def queue(self, commands: list[Command], keys: list[str], args: list[Any]) -> None:
        commands.append(("EVALSHA", self.sha, len(keys), *keys, *args))


@dataclass(eq=False)
class _Request:
    add: Queue
    count: int
    future: asyncio.Future[list[Any]]
    scripts: tuple[Script, ...] = field(default=())


#: A connection that finished a round trip this recently is used again unchecked.
REUSE_SECONDS = 1.0


class Batcher:
    def __init__(
        self,
        client: aredis.Redis,
        batch_max: int = 256,
        concurrency: int = 4,
        timeout: float = 5.0,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.batch_max = batch_max
        self.concurrency = concurrency
        self._pending: deque[_Request] = deque()
        self._inflight = 0
        self._scheduled = False
        self._background = Background()
        self._idle: list[tuple[Any, float]] = []  # (connection, when it was last used)

    async def run(self, add: Queue, count: int = 1, *scripts: Script) -> list[Any]:
        """Queue ``count`` commands (added by ``add``) and return their results.

        ``scripts`` names the Lua scripts ``add`` calls, to be reloaded on NOSCRIPT.
        Redis errors of the round trip itself (connection, timeout) are raised.
        """
        loop = asyncio.get_running_loop()
        request = _Request(add, count, loop.create_future(), scripts)
        self._pending.append(request)
        if not self._scheduled and self._inflight < self.concurrency:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await request.future

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
            if not reloaded and request.scripts and any(isinstance(r, NoScriptError) for r in mine):
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

    async def _connection(self) -> Any:
        pool = self.client.connection_pool
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn, used = self._idle.pop()
            if now - used < REUSE_SECONDS:
                return conn
            await pool.release(conn)
        return await pool.get_connection()

    async def _round_trip(self, commands: list[Command]) -> list[Any]:
        pool = self.client.connection_pool
        packed = b"".join(hiredis.pack_command(c) for c in commands)
        conn = await self._connection()
        try:
            async with asyncio.timeout(self.timeout):
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
            await pool.release(conn)
            if isinstance(exc, TimeoutError):
                raise RedisTimeout(f"Redis did not answer within {self.timeout}s") from None
            raise
        self._idle.append((conn, asyncio.get_running_loop().time()))
        return replies

    async def _reload(self, scripts: set[Script]) -> None:
        for script in scripts:
            log.info("loading Lua script %s", script.sha)
            await self.client.script_load(script.source)
