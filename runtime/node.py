"""A troth node: hosts cells for the shards it owns, and runs their services.

The node is the only place that knows which actors are active. It

* activates a cell on the first message for an actor of a shard it owns, and
  passivates it after ``idle_seconds`` without messages (autonomous actors stay
  active while the node owns their shard, and are re-activated when it claims one);
* hands every commit's side effects to the outbox dispatcher and timer scheduler;
* follows the lease manager: on gaining shards it loads their outbox and timers
  and wakes their autonomous actors; on losing shards it stops their cells at once;
  on surplus it drains the shards (queued messages finish) before releasing them.

Thread safety: the cell map is guarded by one lock, held only to look up, create
or remove cells and to post to them, so no message is ever posted to a cell after
the node decided to stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import pykka
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .access import OPERATOR, Caller, check_access
from .actor import CA
from .aio import LoopThread
from .caas.actor import Commitment, EventBus
from .catalog import Catalog
from .cell import Cell, CellHandle, Envelope
from .checkpoint import CheckpointStore
from .committer import GroupCommitter
from .config import Config
from .errors import BadRequestError, NotFoundError, RetryableError, UnavailableError
from .keys import KeySpace
from .leases import LeaseManager
from .metrics import NodeMetrics
from .names import ActorName, shard_of
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

HOUSEKEEPING_SECONDS = 0.05
DRAIN_SECONDS = 10.0


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


#: Connections one node opens to Redis at most; busy threads wait for a free one.
REDIS_MAX_CONNECTIONS = 64


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
    # One immediate retry of a dropped connection; none of a timeout, which would only
    # double the wait (redis-py's default retries three times with backoff).
    retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    return redis.Redis(connection_pool=pool, retry=retry)


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
        self.store = CheckpointStore(
            self.client,
            self.keys,
            self.node_id,
            config.runtime.reply_cache_max,
            config.runtime.reply_cache_seconds,
            config.runtime.notify_max,
        )
        self.committer = GroupCommitter(self.store, config.runtime.commit_batch_max)
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
        self.io = LoopThread(f"troth-io-{self.node_id}")
        self.router = Router(self, secret="")
        self._cells: dict[str, CellHandle] = {}
        self._pulses: list[tuple[float, int, CellHandle]] = []
        self._pulse_tie = itertools.count()
        self._draining: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._housekeeper = threading.Thread(
            target=self._housekeeping, name="troth-housekeeper", daemon=True
        )
        self.metrics.bind_gauges(
            active=lambda: len(self._cells),
            shards=lambda: len(self.leases.owned),
            outbox=lambda: len(self.dispatcher),
            timers=lambda: len(self.scheduler),
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Register, claim shards (synchronously: a lone node owns all on return)."""
        self.client.set(self.keys.secret, secrets.token_hex(32), nx=True)
        self.router.secret = self.client.get(self.keys.secret).decode()
        self.scheduler.start()
        self.dispatcher.start()
        self.leases.start()
        self._housekeeper.start()
        log.info(
            "node %s started: %d shards, types %s",
            self.node_id,
            len(self.leases.owned),
            sorted(t.name for t in self.catalog),
        )

    def stop(self) -> None:
        """Graceful stop: finish queued messages, then give the shards back."""
        self._stop.set()
        self._housekeeper.join(timeout=5)
        with self._lock:
            cells = list(self._cells.values())
            self._cells.clear()
        self._stop_cells(cells)
        self.scheduler.stop()
        self.dispatcher.stop()
        self.committer.close()
        self.leases.stop(release=True)
        with contextlib.suppress(Exception):
            self.io.submit(self.router.close()).result(timeout=5)
        self.io.stop()
        for factory in self.plugin_factories.values():
            factory.close()
        self.client.close()
        self._probe.close()
        log.info("node %s stopped", self.node_id)

    def _node_info(self) -> dict[str, str]:
        return {
            "url": self.url,
            "pid": str(os.getpid()),
            "host": socket.gethostname(),
            "started": str(int(self.started_at)),
            "active": str(len(self._cells)),
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
        """Queue a call on this node; the future resolves after the call's commit.

        Raises :class:`NotFoundError` for an unknown type or a method ``caller`` may
        not call, :class:`ForbiddenError` for an actor it does not own (see
        :mod:`troth.access`), and :class:`RetryableError` when this node does not own
        the actor's shard.
        """
        atype = self.catalog.get(name.type)
        check_access(caller, name, method, atype.methods, atype.internal_methods)
        if request_id is not None and not (0 < len(request_id) <= 200):
            raise BadRequestError("request_id must be 1 to 200 characters")
        msg = Message(
            "call", method, list(args or []), dict(kwargs or {}), request_id, None, caller
        )
        return self.post(name, msg)

    def post(self, name: ActorName, msg: Message) -> Future[Any]:
        fut: Future[Any] = Future()
        shard = shard_of(name, self.keys.shard_count)
        with self._lock:
            cell = self._cell_for(name, shard)
            if cell.queued >= self.config.runtime.max_mailbox:
                raise UnavailableError(f"{name}: mailbox full ({cell.queued} queued)")
            cell.post(Envelope(msg, fut))
        return fut

    def _cell_for(self, name: ActorName, shard: int) -> CellHandle:
        """The active cell of ``name``, activating it. Call with the lock held."""
        key = str(name)
        cell = self._cells.get(key)
        if cell is not None:
            return cell
        epoch = self.leases.epoch_of(shard)
        if epoch is None or shard in self._draining:
            raise UnavailableError(f"{name}: shard {shard} is not served by node {self.node_id}")
        atype = self.catalog.get(name.type)
        handle = CellHandle(name, shard, epoch, atype)
        self._cells[key] = Cell.spawn(self, handle)
        if atype.pulse_seconds:
            self._schedule_pulse(handle, time.monotonic() + atype.pulse_seconds)
        return handle

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
        the receiver's commit."""
        coro = self.router.call(
            ActorName.parse(target), method, args, kwargs, request_id, caller, timeout=timeout
        )
        try:
            return self.io.submit(coro).result(timeout=timeout + 1)
        except FutureTimeout:
            raise UnavailableError(f"{target}.{method}: no reply within {timeout}s") from None

    # -- commits, cells ----------------------------------------------------------------

    def after_commit(self, shard: int, ops: CommitOps) -> None:
        if ops.outbox:
            self.dispatcher.submit(shard, ops.outbox)
        for key in ops.timers_cancel:
            self.scheduler.cancel(key)
        for timer in ops.timers_set:
            self.scheduler.add(shard, timer)

    def cell_stopped(self, handle: CellHandle) -> None:
        with self._lock:
            if self._cells.get(str(handle.name)) is handle:
                del self._cells[str(handle.name)]

    def _fire_timer(self, shard: int, timer: TimerRecord) -> Future[Any]:
        try:
            return self.post(
                ActorName.parse(timer.actor), Message("timer", timer.method, timer=timer)
            )
        except RetryableError as exc:
            fut: Future[Any] = Future()
            fut.set_exception(exc)
            return fut

    async def redis_ok(self) -> bool:
        """Whether Redis answers a PING within the probe's bound (at most 2 s)."""
        bound = min(2.0, self.config.redis.timeout_seconds)
        try:
            return bool(await asyncio.wait_for(asyncio.to_thread(self._probe.ping), bound + 0.5))
        except (redis.RedisError, TimeoutError):
            return False

    @property
    def active_actors(self) -> int:
        return len(self._cells)

    # -- housekeeping: pulses and passivation -------------------------------------------

    def _schedule_pulse(self, cell: CellHandle, at: float) -> None:
        """Queue ``cell``'s next pulse. Call with the lock held."""
        cell.next_pulse = at
        heapq.heappush(self._pulses, (at, next(self._pulse_tie), cell))

    def _housekeeping(self) -> None:
        """Pulses from a heap (cost per due pulse, not per active actor), and once a
        second a passivation sweep of the idle non-autonomous cells."""
        last_sweep = 0.0
        while not self._stop.wait(HOUSEKEEPING_SECONDS):
            now = time.monotonic()
            to_stop: list[CellHandle] = []
            with self._lock:
                while self._pulses and self._pulses[0][0] <= now:
                    at, _, cell = heapq.heappop(self._pulses)
                    if self._cells.get(str(cell.name)) is not cell or cell.next_pulse != at:
                        continue  # passivated, stopped, or rescheduled
                    if not cell.pulse_queued:
                        cell.post(Envelope(Message("pulse", "pulse")))
                    self._schedule_pulse(cell, now + (cell.atype.pulse_seconds or 1.0))
                if now - last_sweep >= 1.0:
                    last_sweep = now
                    for key, cell in list(self._cells.items()):
                        if not cell.atype.autonomous and cell.idle_for > cell.atype.idle_seconds:
                            del self._cells[key]
                            to_stop.append(cell)
            for cell in to_stop:
                log.debug("passivating %s", cell.name)
                cell.stop()

    @staticmethod
    def _stop_cells(cells: list[CellHandle], timeout: float = DRAIN_SECONDS) -> None:
        futures = [f for f in (cell.stop() for cell in cells) if f is not None]
        deadline = time.monotonic() + timeout
        for fut in futures:
            with contextlib.suppress(pykka.Timeout, pykka.ActorDeadError):
                fut.get(timeout=max(0.01, deadline - time.monotonic()))

    # -- shard ownership changes ---------------------------------------------------------

    def _shards_gained(self, gained: dict[int, str]) -> None:
        shards = sorted(gained)
        self.scheduler.load_shards(shards)
        self.dispatcher.load_shards(shards)
        pipe = self.client.pipeline(transaction=False)
        for s in shards:
            pipe.smembers(self.keys.shard(s).autonomous)
        woken = 0
        for members in pipe.execute():
            for raw in members:
                name = ActorName.parse(raw.decode())
                try:
                    atype = self.catalog.get(name.type)
                except NotFoundError:
                    continue
                if atype.autonomous:
                    with self._lock:
                        cell = self._cell_for(name, shard_of(name, self.keys.shard_count))
                        self._schedule_pulse(cell, 0.0)  # it may have missed pulses moving
                    woken += 1
        log.info(
            "node %s gained %d shards, woke %d autonomous actors", self.node_id, len(shards), woken
        )

    def _shards_lost(self, lost: set[int]) -> None:
        with self._lock:
            cells = [c for c in self._cells.values() if c.shard in lost]
            for c in cells:
                del self._cells[str(c.name)]
        for c in cells:
            c.stop()
        self.scheduler.drop_shards(lost)
        self.dispatcher.drop_shards(lost)

    def _shards_surplus(self, shards: list[int]) -> None:
        surplus = set(shards)
        with self._lock:
            self._draining |= surplus
            cells = [c for c in self._cells.values() if c.shard in surplus]
            for c in cells:
                del self._cells[str(c.name)]
        self._stop_cells(cells)
        self.scheduler.drop_shards(surplus)
        self.dispatcher.drop_shards(surplus)
        self.leases.release(shards)
        with self._lock:
            self._draining -= surplus
        log.info("node %s handed off %d shards", self.node_id, len(shards))
