"""A troth node: the engine of the shards it owns, and the services around it.

A node runs one asyncio event loop on a thread of its own (:class:`LoopThread`):
the engine (every active actor), the HTTP and WebSocket server, node-to-node
forwarding and the Redis round trips of commits all run there. Around it, a few
threads whose number does not depend on the number of actors: the lease heartbeat,
the timer scheduler, the outbox dispatcher's workers and the pool that runs plain
(non-async) actor methods.

The node wires them together: it follows the lease manager (on gaining shards it
loads their outbox and timers and wakes their autonomous actors; on losing shards
the engine forgets their cells at once; on surplus it drains them before
releasing), and hands every commit's side effects to the dispatcher and scheduler.
Its :meth:`call` and :meth:`post` may be used from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .access import OPERATOR, Caller
from .actor import CA
from .aio import LoopThread
from .batcher import Batcher
from .caas.actor import Commitment, EventBus
from .catalog import Catalog
from .checkpoint import CheckpointStore
from .config import Config
from .engine import Engine
from .errors import UnavailableError
from .keys import KeySpace
from .leases import LeaseManager
from .metrics import NodeMetrics
from .names import ActorName
from .outbox import OutboxDispatcher
from .plugin import CommitOps, PluginFactory, TimerRecord
from .quotas import Quotas
from .routing import Router
from .scheduler import TimerScheduler
from .transaction import Message

log = logging.getLogger(__name__)

#: Actor types every node hosts: Commitment-as-a-Service.
BUILTIN_TYPES: dict[str, type[CA]] = {"commitment": Commitment, "cmbus": EventBus}
REQUIRED_PLUGINS = ("timers", "send", "commitments")


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


#: Connections one node opens to Redis at most; busy threads wait for a free one.
REDIS_MAX_CONNECTIONS = 64


def _retry() -> Retry:
    """One immediate retry of a dropped connection; none of a timeout, which would only
    double the wait (redis-py's default retries three times with backoff)."""
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def redis_client(
    url: str, timeout: float = 5.0, max_connections: int = REDIS_MAX_CONNECTIONS
) -> redis.Redis:
    """A client whose pool is bounded (a thousand activating actors share 64
    connections) and whose every wait, for a connection or for a reply, ends after
    ``timeout`` seconds: a Redis that is down or paused becomes a 503, not a hang."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool, retry=_retry())


def async_redis_client(url: str, timeout: float, max_connections: int = 32) -> aredis.Redis:
    """The engine's client. Replies have no per-read timeout here: the
    :class:`Batcher` bounds each round trip as a whole (``timeout``)."""
    pool = aredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=None,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )
    return aredis.Redis(connection_pool=pool, retry=_retry())


class Node:
    def __init__(
        self,
        config: Config,
        redis_url: str,
        node_id: str | None = None,
        builtin_types: dict[str, type[CA]] | None = None,
    ) -> None:
        from troth.plugins import build_factories  # plugins import runtime modules

        self.config = config
        self.node_id = node_id or config.node.node_id or default_node_id()
        self.redis_url = redis_url
        self.client = redis_client(redis_url, config.redis.timeout_seconds)
        #: A separate, small client for /health, so a busy pool never delays the answer.
        self._probe = redis_client(redis_url, min(2.0, config.redis.timeout_seconds), 2)
        self.keys = KeySpace(config.redis.key_prefix, config.cluster.shards)
        self.metrics = NodeMetrics()
        self.catalog = Catalog.from_config(
            config, BUILTIN_TYPES if builtin_types is None else builtin_types
        )
        self.loop_thread = LoopThread(f"troth-engine-{self.node_id}")
        self.loop = self.loop_thread.loop
        self.aclient = async_redis_client(redis_url, config.redis.timeout_seconds)
        self.batcher = Batcher(
            self.aclient, config.runtime.commit_batch_max, timeout=config.redis.timeout_seconds
        )
        self.store = CheckpointStore(
            self.batcher,
            self.keys,
            self.node_id,
            config.runtime.reply_cache_max,
            config.runtime.reply_cache_seconds,
            config.runtime.notify_max,
        )
        self.quotas = Quotas(self.client, self.keys, config.quotas)
        self.url = config.node.public_url or ""
        self.started_at = time.time()
        self.leases = LeaseManager(
            self.client,
            self.keys,
            self.node_id,
            config.cluster.lease_ttl_seconds,
            config.cluster.heartbeat_seconds,
            on_gained=self._shards_gained,
            on_lost=self._shards_lost,
            on_surplus=self._shards_surplus,
            node_info=self._node_info,
        )
        self.scheduler = TimerScheduler(
            self.client,
            self.keys,
            self._fire_timer,
            owns=lambda shard: self.leases.epoch_of(shard) is not None,
        )
        self.dispatcher = OutboxDispatcher(
            self.client,
            self.keys,
            self.node_id,
            self.leases.epoch_of,
            self.deliver,
            self.metrics,
            config.runtime.outbox_workers,
            config.node.call_timeout_seconds,
        )
        # The built-in commitment types need these plugins whatever the config says.
        required: dict[str, dict[str, Any]] = {name: {} for name in REQUIRED_PLUGINS}
        self.plugin_factories: dict[str, PluginFactory] = build_factories(
            self, {**required, **config.plugins}
        )
        for factory in self.plugin_factories.values():
            for executor in factory.executors():
                self.dispatcher.register(executor)
        self.engine = Engine(
            catalog=self.catalog,
            store=self.store,
            plugin_factories=self.plugin_factories,
            metrics=self.metrics,
            quotas=self.quotas,
            settings=config.runtime,
            shard_count=self.keys.shard_count,
            epoch_of=self.leases.epoch_of,
            after_commit=self.after_commit,
        )
        self.router = Router(self, secret="")
        self.stopped = False
        self.metrics.bind_gauges(
            active=lambda: len(self.engine.cells),
            shards=lambda: len(self.leases.owned),
            outbox=lambda: len(self.dispatcher),
            timers=lambda: len(self.scheduler),
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Register, claim shards (synchronously: a lone node owns all on return)."""
        self.client.set(self.keys.secret, secrets.token_hex(32), nx=True)
        self.router.secret = self.client.get(self.keys.secret).decode()
        self._on_loop(self._start_engine()).result(timeout=10)
        self.scheduler.start()
        self.dispatcher.start()
        self.leases.start()
        log.info(
            "node %s started: %d shards, types %s",
            self.node_id,
            len(self.leases.owned),
            sorted(t.name for t in self.catalog),
        )

    async def _start_engine(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        """Graceful stop: finish queued messages, then give the shards back."""
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(Exception):
            self._on_loop(self.engine.stop()).result(timeout=15)
        self.scheduler.stop()
        self.dispatcher.stop()
        self.leases.stop(release=True)
        with contextlib.suppress(Exception):
            self._on_loop(self._close_loop_resources()).result(timeout=5)
        self.loop_thread.stop()
        for factory in self.plugin_factories.values():
            factory.close()
        self.client.close()
        self._probe.close()
        log.info("node %s stopped", self.node_id)

    async def _close_loop_resources(self) -> None:
        await self.router.close()
        await self.aclient.aclose()

    def _on_loop(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def _node_info(self) -> dict[str, str]:
        return {
            "url": self.url,
            "pid": str(os.getpid()),
            "host": socket.gethostname(),
            "started": str(int(self.started_at)),
            "active": str(len(self.engine.cells)),
            "shards": str(len(self.leases.owned)),
            "served": self.leases.served_bitmap(),
        }

    # -- calls -------------------------------------------------------------------------

    def call(
        self,
        name: ActorName,
        method: str,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        request_id: str | None = None,
        caller: Caller = OPERATOR,
    ) -> Future[Any]:
        """Queue a call on this node from any thread; the future resolves after the
        call's commit (see :meth:`Engine.call` for the errors)."""
        return self._on_loop(
            self.engine.call(name, method, list(args or []), dict(kwargs or {}), request_id, caller)
        )

    def post(self, name: ActorName, msg: Message) -> Future[Any]:
        """Queue ``msg`` from any thread; resolves after the message's commit."""

        async def post() -> Any:
            return await self.engine.post(name, msg)

        return self._on_loop(post())

    def deliver(
        self,
        target: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        request_id: str,
        timeout: float,
        caller: Caller,
    ) -> Any:
        """Deliver a message from the outbox to its owner, wherever it is, and wait for
        the receiver's commit (from an outbox worker thread)."""
        coro = self.router.call(
            ActorName.parse(target), method, args, kwargs, request_id, caller, timeout=timeout
        )
        try:
            return self._on_loop(coro).result(timeout=timeout + 1)
        except FutureTimeout:
            raise UnavailableError(f"{target}.{method}: no reply within {timeout}s") from None

    async def redis_ok(self) -> bool:
        """Whether Redis answers a PING within the probe's bound (at most 2 s)."""
        bound = min(2.0, self.config.redis.timeout_seconds)
        try:
            return bool(await asyncio.wait_for(asyncio.to_thread(self._probe.ping), bound + 0.5))
        except (redis.RedisError, TimeoutError):
            return False

    @property
    def active_actors(self) -> int:
        return len(self.engine.cells)

    # -- commits ----------------------------------------------------------------------------

    def after_commit(self, shard: int, ops: CommitOps) -> None:
        if ops.outbox:
            self.dispatcher.submit(shard, ops.outbox)
        for key in ops.timers_cancel:
            self.scheduler.cancel(key)
        for timer in ops.timers_set:
            self.scheduler.add(shard, timer)

    def _fire_timer(self, shard: int, timer: TimerRecord) -> Future[Any]:
        return self.post(ActorName.parse(timer.actor), Message("timer", timer.method, timer=timer))

    # -- shard ownership changes (from the lease thread) ---------------------------------------

    def _shards_gained(self, gained: dict[int, str]) -> None:
        shards = sorted(gained)
        self.scheduler.load_shards(shards)
        self.dispatcher.load_shards(shards)
        pipe = self.client.pipeline(transaction=False)
        for s in shards:
            pipe.smembers(self.keys.shard(s).autonomous)
        names = [ActorName.parse(raw.decode()) for members in pipe.execute() for raw in members]

        async def wake() -> int:
            return self.engine.wake(names)

        woken = self._on_loop(wake()).result(timeout=30) if names else 0
        log.info(
            "node %s gained %d shards, woke %d autonomous actors", self.node_id, len(shards), woken
        )

    def _shards_lost(self, lost: set[int]) -> None:
        self._on_loop(self.engine.drop_shards(lost, drain=False)).result(timeout=10)
        self.scheduler.drop_shards(lost)
        self.dispatcher.drop_shards(lost)

    def _shards_surplus(self, shards: list[int]) -> None:
        surplus = set(shards)
        with contextlib.suppress(FutureTimeout):
            self._on_loop(self.engine.drop_shards(surplus, drain=True)).result(timeout=15)
        self.scheduler.drop_shards(surplus)
        self.dispatcher.drop_shards(surplus)
        self.leases.release(shards)
        log.info("node %s handed off %d shards", self.node_id, len(shards))
