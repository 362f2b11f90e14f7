"""A troth node: the engine of the shards it owns, and the services around it.

A node runs one asyncio event loop on a thread of its own (:class:`LoopThread`):
the engine (every active actor), the HTTP and WebSocket server, node-to-node
forwarding and the Redis round trips of commits all run there. Around it, a few
threads whose number does not depend on the number of actors: the lease heartbeat,
the timer scheduler, the outbox dispatcher's workers and the pool that runs plain
(non-async) actor methods.

The node is the composition root: it loads the configuration's extensions, builds
every part and hands each one only what it uses (nothing else holds the node). It
then follows the lease manager (on gaining shards it loads their outbox and timers
and wakes their autonomous actors; on losing shards the engine forgets their cells
at once; on surplus it drains them before releasing), and hands every commit's
side effects to the dispatcher and scheduler. Its :meth:`call` may be used from any
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis

from troth.cluster.leases import LeaseManager
from troth.cluster.routing import Router
from troth.core import compiled, tracing
from troth.core.access import OPERATOR, Caller
from troth.core.actor import CA
from troth.core.aio import LoopThread, check_cpu, pinned
from troth.core.batcher import Batcher
from troth.core.catalog import Catalog
from troth.core.checkpoint import CheckpointStore
from troth.core.clock import SYSTEM_CLOCK, Clock
from troth.core.config import Config, ConfigError
from troth.core.keys import KeySpace
from troth.core.metrics import NodeMetrics
from troth.core.names import ActorName
from troth.core.plugin import PluginContext, PluginFactory
from troth.core.records import CommitOps, TimerRecord
from troth.core.redis_clients import async_redis_client, cluster_url, redis_client
from troth.core.transaction import Message
from troth.engine.engine import Engine
from troth.engine.outbox import OutboxDispatcher
from troth.engine.quotas import Quotas
from troth.engine.scheduler import TimerScheduler
from troth.extension import Extension, NodeContext, load_extensions
from troth.plugins import BUILTIN, build_factories, check_settings

log = logging.getLogger(__name__)


def _extension_types(extensions: list[Extension]) -> dict[str, type[CA]]:
    types: dict[str, type[CA]] = {}
    for ext in extensions:
        for name, cls in ext.actor_types().items():
            if name in types:
                raise ConfigError(f"extensions: actor type {name!r} is defined twice")
            types[name] = cls
    return types


def _extension_plugins(extensions: list[Extension]) -> dict[str, type[PluginFactory]]:
    plugins: dict[str, type[PluginFactory]] = {}
    for ext in extensions:
        for name, cls in ext.plugins().items():
            if plugins.get(name, cls) is not cls or BUILTIN.get(name, cls) is not cls:
                raise ConfigError(f"extensions: plugin {name!r} is defined twice")
            plugins[name] = cls
    return plugins


def check_config(config: Config) -> None:
    """Check what ``config`` says without Redis: its extensions, its actor types
    (imported and checked) and every plugin's settings. Raises ConfigError."""
    extensions = load_extensions(config)
    Catalog.from_config(config, _extension_types(extensions))
    check_settings(config.plugins, _extension_plugins(extensions))
    _pinned_cpu(config)


def _pinned_cpu(config: Config) -> int | None:
    """``runtime.cpu``, once checked against the CPUs this process may use."""
    cpu = config.runtime.cpu
    if cpu is not None:
        try:
            check_cpu(cpu)
        except ValueError as exc:
            raise ConfigError(f"runtime.cpu: {exc}") from None
    return cpu


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class Node:
    """Builds every part of a node from its configuration and hands each part only
    the collaborators it uses (the composition root: nothing else holds the node)."""

    def __init__(
        self,
        config: Config,
        redis_url: str,
        node_id: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        cpu = _pinned_cpu(config)  # (checked before anything starts)
        tracing.from_env()
        self.extensions = load_extensions(config)
        self.catalog = Catalog.from_config(config, _extension_types(self.extensions))
        required_plugins = _extension_plugins(self.extensions)
        self.node_id = node_id or config.node.node_id or default_node_id()
        self.redis_url = redis_url
        #: The seed node's URL when Redis is a cluster (every client routes by slot).
        self.cluster = cluster_url(redis_url)
        timeout = config.redis.timeout_seconds
        self.client = redis_client(redis_url, timeout, cluster=self.cluster)
        #: A separate, small client for /health, so a busy pool never delays the answer.
        self._probe = redis_client(redis_url, min(2.0, timeout), 2, cluster=self.cluster)
        self.keys = KeySpace(config.redis.key_prefix, config.cluster.shards)
        self.metrics = NodeMetrics()
        self.loop_thread = LoopThread(f"troth-engine-{self.node_id}", cpu)
        self.loop = self.loop_thread.loop
        self.aclient = async_redis_client(redis_url, timeout, cluster=self.cluster)
        self.batcher = Batcher(
            self.aclient,
            config.runtime.commit_batch_max,
            timeout=timeout,
            wait_replicas=config.redis.wait_replicas,
            on_redirect=lambda reply: self.metrics.redis_redirects.labels(reply).inc(),
        )
        self.store = CheckpointStore(
            self.batcher,
            self.keys,
            self.node_id,
            config.runtime.reply_cache_max,
            config.runtime.reply_cache_seconds,
            config.runtime.notify_max,
            clock,
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
            on_commands=self._commands,
        )
        self.scheduler = TimerScheduler(
            self.client,
            self.keys,
            self._fire_timer,
            owns=lambda shard: self.leases.epoch_of(shard) is not None,
            loop=self.loop,
            clock=clock,
        )
        self.dispatcher = OutboxDispatcher(
            client=self.client,
            batcher=self.batcher,
            loop=self.loop,
            keys=self.keys,
            node_id=self.node_id,
            epoch_of=self.leases.epoch_of,
            deliver=self.deliver,
            take_result=self._take_result,
            metrics=self.metrics,
            concurrency=config.runtime.outbox_workers,
            deliver_timeout=config.node.call_timeout_seconds,
            clock=clock,
        )
        self.plugin_factories: dict[str, PluginFactory] = build_factories(
            PluginContext(
                self.node_id,
                self.client,
                self.batcher,
                self.keys,
                self.metrics,
                self.deliver,
                clock,
                cluster=self.cluster is not None,
            ),
            config.plugins,
            required_plugins,
        )
        self.store.add_steps(
            {n: lua for f in self.plugin_factories.values() for n, lua in f.commit_steps().items()}
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
            hooks=self,
        )
        self.router = Router(
            self.catalog,
            self.engine,
            self.leases,
            config.node.call_timeout_seconds,
            max_batch_bytes=config.node.max_body_bytes,
        )
        #: What the extensions' routes may use of this node.
        self.context = NodeContext(
            node_id=self.node_id,
            config=config,
            client=self.client,
            keys=self.keys,
            quotas=self.quotas,
            plugins=self.plugin_factories,
            call=self.router.call,
            call_many=self.router.call_many,
            clock=clock,
        )
        for ext in self.extensions:
            for collector in ext.collectors(self.context):
                self.metrics.registry.register(collector)
        self.stopped = False
        self.metrics.loop_schedule.watch(self.loop_thread.native_id)
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
        for factory in self.plugin_factories.values():
            factory.start()
        self._on_loop(self._start_engine()).result(timeout=10)
        with pinned(self.loop_thread.cpu):  # their threads on the loop's CPU, if pinned
            self.scheduler.start()
            self.dispatcher.start()
            self.leases.start()
        log.info(
            "node %s started: %d shards, types %s, %d modules compiled",
            self.node_id,
            len(self.leases.owned),
            sorted(t.name for t in self.catalog),
            len(compiled.compiled()),
        )
        for name in compiled.stale():
            log.warning(
                "%s runs compiled from an older version of its .py file: install troth "
                "again to run the edit (or install with TROTH_PURE_PYTHON=1)",
                name,
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

    def halt(self) -> None:
        """Stop as ``kill -9`` would leave things: no drain, no lease released, nothing
        awaiting Redis takes another step, connections dropped. For test kits
        (:mod:`troth.testing`) that simulate a crash in-process; a new node over the
        same Redis then recovers what this one committed."""
        self.stopped = True
        self.leases.stop(release=False)
        self.scheduler.stop()
        self.dispatcher.stop(grace=0)
        with contextlib.suppress(Exception):
            self._on_loop(self._abandon_loop()).result(timeout=10)
        self.loop_thread.stop()
        self.engine.invoke.close()
        for factory in self.plugin_factories.values():
            with contextlib.suppress(Exception):
                factory.close()
        self.client.close()
        self._probe.close()

    async def _abandon_loop(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_loop_resources()

    # -- quiescence (for test kits driving a manual clock) ----------------------------

    def next_due_ms(self) -> int | None:
        """When the next timer, outbox attempt or pulse of this node falls due (ms on
        the node's clock), or None."""
        due = [self.scheduler.queue.next_due(), self.dispatcher.queue.next_due()]
        pulse = self._on_loop(self._next_pulse()).result(timeout=10)
        if pulse is not None:
            delay = pulse - self.clock.monotonic()
            due.append(self.clock.now_ms() + round(delay * 1000))
        return min((d for d in due if d is not None), default=None)

    def settled(self) -> bool:
        """Whether nothing is due now, queued, running or being attempted here."""
        now = self.clock.now_ms()
        # what lies beyond the due queues' window is not due now (reading_due covers
        # the window's moving on)
        queues = (self.scheduler.queue, self.dispatcher.queue)
        due = [q.next_due(beyond_window=False) for q in queues]
        if any(d is not None and d <= now for d in due):
            return False
        if self.scheduler.in_flight or self.dispatcher.in_flight:
            return False
        if any(q.reading_due for q in queues):
            return False  # work due now may still be in Redis only
        return bool(self._on_loop(self._engine_settled()).result(timeout=10))

    async def _next_pulse(self) -> float | None:
        return self.engine.next_pulse()

    async def _engine_settled(self) -> bool:
        pulse = self.engine.next_pulse()
        return not self.engine.busy and (pulse is None or pulse > self.clock.monotonic())

    async def _close_loop_resources(self) -> None:
        for factory in self.plugin_factories.values():
            with contextlib.suppress(Exception):
                await factory.aclose()
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
            "cpu": "" if self.loop_thread.cpu is None else str(self.loop_thread.cpu),
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

        async def run() -> Any:
            return await self.engine.call(
                name, method, list(args or []), dict(kwargs or {}), request_id, caller
            )

        return self._on_loop(run())

    async def deliver(
        self,
        target: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        request_id: str | None,
        timeout: float,
        caller: Caller,
    ) -> Any:
        """Deliver a message from the outbox to its owner, wherever it is, and return
        the receiver's reply after its commit (on the node's loop). Without a
        ``request_id`` no reply is kept: the receiver must take repeats by itself."""
        return await self.router.call(
            ActorName.parse(target),
            method,
            args,
            kwargs,
            request_id,
            caller,
            timeout=timeout,
            reply_cache=request_id is not None,
        )

    async def _take_result(self, origin: str, msg: Message) -> None:
        """An outbox entry's outcome, to its origin on this node (the dispatcher only
        attempts entries of shards this node owns, and so hosts their origins)."""
        cell = self.engine.cells.get(origin)  # usually active: its name need not be parsed
        await self.engine.post(cell.name if cell is not None else ActorName.parse(origin), msg)

    async def health(self) -> dict[str, Any] | None:
        """This node's figures if Redis answers a PING within the probe's bound (at
        most 2 s), else None."""
        bound = min(2.0, self.config.redis.timeout_seconds)
        try:
            await asyncio.wait_for(asyncio.to_thread(self._probe.ping), bound + 0.5)
        except (redis.RedisError, TimeoutError):
            return None
        return {
            "node": self.node_id,
            "shards": len(self.leases.owned),
            "active_actors": self.active_actors,
            "draining": self.leases.draining,
        }

    @property
    def active_actors(self) -> int:
        return len(self.engine.cells)

    # -- commits ----------------------------------------------------------------------------

    def before_commit(self, ops: CommitOps) -> None:
        if ops.outbox:
            self.dispatcher.record_first_attempts(ops.outbox)

    def after_commit(self, shard: int, ops: CommitOps) -> None:
        for entry_id in ops.outbox_withdraw:
            self.dispatcher.queue.discard(entry_id)
        if ops.outbox:
            self.dispatcher.submit(shard, ops.outbox)
        for key in ops.timers_cancel:
            self.scheduler.cancel(key)
        for timer in ops.timers_set:
            self.scheduler.add(shard, timer)

    def _fire_timer(self, shard: int, timer: TimerRecord) -> asyncio.Future[Any]:
        """On the loop: the timer's firing message, resolved after its commit."""
        msg = Message("timer", timer.method, timer=timer)
        return self.engine.post(ActorName.parse(timer.actor), msg)

    def _commands(self, commands: list[bytes]) -> None:
        """Operator commands from the node's inbox (from the lease thread; see
        :mod:`troth.edge.admin`). A command for a shard this node no longer owns is
        dropped: its next owner loads the shard's outbox queue anyway."""
        for raw in commands:
            try:
                command = json.loads(raw)
                shard = command["shard"]
                if command.get("op") == "redrive" and self.leases.epoch_of(shard):
                    self.dispatcher.queue.push(self.clock.now_ms(), shard, command["entry"])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("node %s: ignored a malformed inbox command: %s", self.node_id, exc)

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
