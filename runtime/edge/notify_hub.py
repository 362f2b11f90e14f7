"""One reader of notification streams per node, shared by every client session.

Actors' committed notifications live in Redis streams (one per actor). A session
that subscribes to an actor is served from this hub: a single loop issues one
``XREAD BLOCK`` over every subscribed stream and hands each entry to the
subscriptions of that stream through bounded queues. A node therefore holds one
Redis connection for notifications whatever the number of sessions and
subscriptions, and a slow client only ever waits for itself.

On Redis Cluster one ``XREAD`` may only name streams of one slot (one shard), and
blocking on hundreds of shards would take a connection each: the hub then reads
every slot's streams without blocking, one batched round trip per master through
the engine's :class:`~troth.core.batcher.Batcher`, and pauses ``POLL_SECONDS``
when nothing came. A notification then reaches its session within about that much
more than on a single Redis.

Guarantees, per subscription: entries arrive in stream (commit) order, each once,
starting after the ``since`` id the client gave. A subscription whose queue is full
is skipped by the reader until its client catches up; nothing is dropped, because
the reader resumes from the last id that subscription accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aredis
from redis.crc import key_slot

from troth.core import codec
from troth.core.batcher import Batcher, Command
from troth.core.errors import UnavailableError

log = logging.getLogger(__name__)

READ_BLOCK_MS = 250
#: On Redis Cluster: the pause between reads that found nothing.
POLL_SECONDS = 0.05
READ_COUNT = 100
QUEUE_SIZE = 256


def _field(fields: Any, name: bytes) -> Any:
    """A field of a stream entry: a dict from redis-py, a flat list from the batcher."""
    if isinstance(fields, dict):
        return fields[name]
    return fields[fields.index(name) + 1]


def parse_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class Subscription:
    """One session's interest in one stream; ``last`` is the last id it accepted."""

    key: str
    last: str
    send: Callable[[str, Any], Awaitable[None]]
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    task: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        while True:
            nid, data = await self.queue.get()
            await self.send(nid, data)


class NotificationHub:
    def __init__(
        self,
        redis_url: str,
        max_subscriptions: int,
        timeout: float,
        cluster_batcher: Batcher | None = None,
    ) -> None:
        """``cluster_batcher``: on Redis Cluster, the node's batcher (reads poll)."""
        self.redis_url = redis_url
        self.batcher = cluster_batcher
        self.max_subscriptions = max_subscriptions
        self.timeout = timeout
        self._subs: dict[str, list[Subscription]] = {}
        self._count = 0
        self._reader: asyncio.Task[None] | None = None
        self._client: aredis.Redis | None = None

    def __len__(self) -> int:
        return self._count

    def subscribe(
        self, key: str, since: str, send: Callable[[str, Any], Awaitable[None]]
    ) -> Subscription:
        """Start delivering entries of ``key`` after ``since`` to ``send``."""
        if self._count >= self.max_subscriptions:
            raise UnavailableError(
                f"this node serves {self.max_subscriptions} subscriptions at most; "
                "try another node or later"
            )
        sub = Subscription(key, since, send)
        sub.task = asyncio.create_task(sub._pump())
        self._subs.setdefault(key, []).append(sub)
        self._count += 1
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key, [])
        if sub in subs:
            subs.remove(sub)
            self._count -= 1
            if not subs:
                del self._subs[sub.key]
        if sub.task is not None:
            sub.task.cancel()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for subs in list(self._subs.values()):
            for sub in list(subs):
                self.unsubscribe(sub)
        if self._client is not None:
            await self._client.aclose()

    @staticmethod
    async def _poll(batcher: Batcher, streams: dict[str, str]) -> list[Any]:
        """One non-blocking ``XREAD`` per slot (Redis Cluster), all in one batch; a
        pause when nothing came."""
        by_slot: dict[int, dict[str, str]] = {}
        for key, last in streams.items():
            by_slot.setdefault(key_slot(key.encode()), {})[key] = last
        groups = list(by_slot.values())

        def add(commands: list[Command]) -> None:
            for group in groups:
                commands.append(("XREAD", "COUNT", READ_COUNT, "STREAMS", *group, *group.values()))

        batches = [b for reply in await batcher.results(add, len(groups)) for b in reply or []]
        if not batches:
            await asyncio.sleep(POLL_SECONDS)
        return batches

    def _redis(self) -> aredis.Redis:
        if self._client is None:  # made inside the loop that serves the sessions
            self._client = aredis.Redis.from_url(
                self.redis_url,
                max_connections=2,
                socket_timeout=READ_BLOCK_MS / 1000 + self.timeout,
                socket_connect_timeout=self.timeout,
            )
        return self._client

    async def _read(self) -> None:
        while self._subs:
            streams: dict[str, str] = {}
            for key, subs in self._subs.items():
                ready = [s for s in subs if not s.queue.full()]
                if ready:
                    streams[key] = min((s.last for s in ready), key=parse_id)
            if not streams:
                await asyncio.sleep(READ_BLOCK_MS / 1000)
                continue
            try:
                if self.batcher is None:
                    batches = await self._redis().xread(
                        streams, count=READ_COUNT, block=READ_BLOCK_MS
                    )
                else:
                    batches = await self._poll(self.batcher, streams)
            except (aredis.RedisError, OSError) as exc:
                log.warning("notification reader: %s", exc)
                await asyncio.sleep(1)
                continue
            for raw_key, entries in batches or []:
                key = raw_key.decode()
                for raw_id, fields in entries:
                    nid = raw_id.decode()
                    data = codec.unpack(_field(fields, b"d"))
                    for sub in self._subs.get(key, []):
                        if parse_id(nid) > parse_id(sub.last) and not sub.queue.full():
                            sub.queue.put_nowait((nid, data))
                            sub.last = nid
