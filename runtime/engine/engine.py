"""The engine: every active actor of a node, on one asyncio event loop.

An active actor is a :class:`~troth.engine.cell.Cell` (a mailbox and the actor's objects),
never a thread: a node's thread count does not grow with its actors. The engine

* activates a cell on the first message for an actor of a shard the node owns, and
  passivates it after ``idle_seconds`` without messages, or as soon as its mailbox
  is empty after a message that called ``passivate()`` (autonomous actors stay
  active while the node owns their shard, and are woken when it claims one);
* runs pulses from one heap (cost per due pulse, not per active actor);
* on losing shards stops their cells at once; on handing shards off, lets their
  queued messages finish first.

Every method is a coroutine or callback of the engine's loop; other threads reach it
through :class:`~troth.node.Node`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Any

from troth.core import tracing
from troth.core.access import DELETE_ACTOR, Caller, check_access
from troth.core.aio import Background
from troth.core.catalog import Catalog
from troth.core.checkpoint import CheckpointStore
from troth.core.config import RuntimeConfig
from troth.core.errors import BadRequestError, UnavailableError
from troth.core.metrics import NodeMetrics
from troth.core.names import ActorName, shard_of
from troth.core.plugin import PluginFactory
from troth.core.records import CommitOps
from troth.core.transaction import CommitHooks, Invoker, Message
from troth.engine.cell import Cell, Envelope
from troth.engine.quotas import Quotas

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 0.05
DRAIN_SECONDS = 10.0


class Engine:
    def __init__(
        self,
        *,
        catalog: Catalog,
        store: CheckpointStore,
        plugin_factories: dict[str, PluginFactory],
        metrics: NodeMetrics,
        quotas: Quotas,
        settings: RuntimeConfig,
        shard_count: int,
        epoch_of: Callable[[int], str | None],
        hooks: CommitHooks,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.plugin_factories = plugin_factories
        self.metrics = metrics
        self.quotas = quotas
        self.settings = settings
        self.group_max = settings.group_commit_max
        self.shard_count = shard_count
        self.epoch_of = epoch_of
        self._hooks = hooks
        self.invoke = Invoker(settings.sync_workers)
        self.cells: dict[str, Cell] = {}
        self._pulses: list[tuple[float, int, Cell]] = []
        self._tie = itertools.count()
        self._draining: set[int] = set()
        self._housekeeper: asyncio.Task[None] | None = None
        self._background = Background()
        self._min_idle = min((t.idle_seconds for t in catalog), default=1.0)

    # -- what cells need ----------------------------------------------------------------

    def before_commit(self, ops: CommitOps) -> None:
        self._hooks.before_commit(ops)

    def after_commit(self, shard: int, ops: CommitOps) -> None:
        self._hooks.after_commit(shard, ops)

    def cell_stopped(self, cell: Cell) -> None:
        if self.cells.get(cell.key) is cell:
            del self.cells[cell.key]

    def touched(self, cell: Cell) -> None:
        """Keep ``cells`` in order of last activity (oldest first), so the passivation
        sweep reads only the cells that may be idle, not every active one."""
        key = cell.key
        if self.cells.get(key) is cell:
            del self.cells[key]
            self.cells[key] = cell

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._housekeeper = loop.create_task(self._housekeeping())

        # A clock that jumps (troth.testing) runs the pulses it made due at once.
        def jumped() -> None:
            loop.call_soon_threadsafe(self._run_pulses)

        self.store.clock.on_jump(jumped)

    @property
    def busy(self) -> bool:
        """Whether some cell has a message queued or running."""
        return any(
            c.mailbox or (c.task is not None and not c.task.done()) for c in self.cells.values()
        )

    def next_pulse(self) -> float | None:
        """When the next pulse is due (the clock's monotonic time), or None."""
        live = [
            at
            for at, _, c in self._pulses
            if self.cells.get(str(c.name)) is c and c.next_pulse == at
        ]
        return min(live, default=None)

    async def stop(self) -> None:
        """Finish queued messages (up to a deadline), then forget every cell."""
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        cells = list(self.cells.values())
        self.cells.clear()
        await self._stop_cells(cells)
        self.invoke.close()

    # -- messages ----------------------------------------------------------------------------

    def call(
        self,
        name: ActorName,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        request_id: str | None,
        caller: Caller,
        *,
        new_id: bool = False,
        fresh: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue a call on this node (on the loop); the future resolves to its reply
        after its commit (a caller bounds its wait with a timer, not a task).

        ``new_id`` says no earlier attempt used ``request_id`` (the replay look-up is
        skipped). ``fresh`` says the actor cannot exist yet: an
        actor not active here is then activated without reading its checkpoint (one
        round trip less). It is an optimistic shortcut, never a risk to what is
        stored: were the actor there after all, its commit would find the
        checkpoint's seq moved and be refused, and the call retried (the router
        retries without ``fresh``). Only for calls that commit: a read would answer
        from an empty state.

        Raises NotFoundError or ForbiddenError (the access rule), and RetryableError
        when this node does not serve the actor's shard.
        """
        atype = self.catalog.get(name.type)
        check_access(caller, name, method, atype.methods, atype.internal_methods)
        if request_id is not None and not (0 < len(request_id) <= 200):
            raise BadRequestError("request_id must be 1 to 200 characters")
        kind = "delete" if method == DELETE_ACTOR else "call"
        msg = Message(kind, method, args, kwargs, request_id, None, caller, new_id, fresh=fresh)
        return self.post(name, msg)

    def post(self, name: ActorName, msg: Message) -> asyncio.Future[Any]:
        """Queue ``msg`` for ``name``; the future resolves after the message's commit."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        cell = self._cell_for(name)
        if cell.queued >= self.settings.max_mailbox:
            raise UnavailableError(f"{name}: mailbox full ({cell.queued} queued)")
        cell.post(Envelope(msg, fut, trace=tracing.current()))
        return fut

    def _cell_for(self, name: ActorName) -> Cell:
        key = str(name)
        cell = self.cells.get(key)
        if cell is not None:
            return cell
        shard = shard_of(name, self.shard_count)
        epoch = self.epoch_of(shard)
        if epoch is None or shard in self._draining:
            raise UnavailableError(f"{name}: shard {shard} is not served by this node")
        atype = self.catalog.get(name.type)
        cell = self.cells[key] = Cell(self, name, shard, epoch, atype)
        if atype.pulse_seconds:
            self._schedule_pulse(cell, self.store.clock.monotonic() + atype.pulse_seconds)
        return cell

    # -- pulses and passivation ---------------------------------------------------------------

    def _schedule_pulse(self, cell: Cell, at: float) -> None:
        cell.next_pulse = at
        heapq.heappush(self._pulses, (at, next(self._tie), cell))

    async def _housekeeping(self) -> None:
        last_sweep = 0.0
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            try:
                last_sweep = self._housekeep(last_sweep)
            except Exception:
                log.exception("housekeeping failed")

    def _housekeep(self, last_sweep: float) -> float:
        now = self._run_pulses()
        if now - last_sweep < 1.0:
            return last_sweep
        idle: list[tuple[str, Cell]] = []
        for key, cell in self.cells.items():  # oldest activity first (see touched)
            quiet = cell.idle_for
            if quiet < self._min_idle:
                break  # every later cell was active more recently
            if not cell.atype.autonomous and quiet > cell.atype.idle_seconds:
                idle.append((key, cell))
        for key, cell in idle:
            del self.cells[key]
            self._background.spawn(cell.stop())
        return now

    def _run_pulses(self) -> float:
        """Post every pulse that is due; returns the time it read."""
        now = self.store.clock.monotonic()
        while self._pulses and self._pulses[0][0] <= now:
            at, _, cell = heapq.heappop(self._pulses)
            if self.cells.get(cell.key) is not cell or cell.next_pulse != at:
                continue  # passivated, stopped, or rescheduled
            if not cell.pulse_queued:
                cell.post(Envelope(Message("pulse", "pulse")))
            self._schedule_pulse(cell, now + (cell.atype.pulse_seconds or 1.0))
        return now

    # -- shard ownership changes --------------------------------------------------------------

    def wake(self, names: list[ActorName]) -> int:
        """Activate autonomous actors of newly claimed shards; they pulse at once, as
        they may have missed pulses while moving."""
        woken = 0
        for name in names:
            try:
                atype = self.catalog.get(name.type)
                if not atype.autonomous:
                    continue
                cell = self._cell_for(name)
            except Exception:
                continue
            self._schedule_pulse(cell, 0.0)
            woken += 1
        return woken

    async def drop_shards(self, shards: set[int], drain: bool) -> None:
        """Forget the cells of ``shards``: at once when the shards were lost, or after
        their queued messages ran (``drain``) when the node hands them off."""
        if drain:
            self._draining |= shards
        cells = [c for c in self.cells.values() if c.shard in shards]
        for cell in cells:
            del self.cells[cell.key]
        try:
            if drain:
                await self._stop_cells(cells)
            else:
                for cell in cells:  # a message running now is refused at its commit
                    cell._fail(UnavailableError(f"{cell.name}: shard {cell.shard} moved"))
        finally:
            if drain:
                self._draining -= shards

    @staticmethod
    async def _stop_cells(cells: list[Cell], timeout: float = DRAIN_SECONDS) -> None:
        if not cells:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(c.stop() for c in cells), return_exceptions=True), timeout
            )
