"""Which secrets sign a principal's deliveries, and their rotation.

A principal's secret is configured (``plugins.commitments.signing_secrets``), or
random and kept in Redis (one hash a principal: ``current``, and after a rotation
``previous`` with the time it stops signing).

Rotation without a lost delivery (Standard Webhooks lets a delivery carry several
signatures, and a receiver accepts it if any one checks out):

* a configured principal lists its secrets, newest first: each signs every delivery
  until it is taken out of the configuration;
* a random secret is rotated through the API (:meth:`SigningSecrets.rotate`): the
  new one signs at once on the node that rotated, and on every node within
  :data:`REFRESH_SECONDS` (nodes read the secrets again that often); the previous one
  goes on signing for ``keep_previous_seconds``. A receiver moves to the new secret
  between the two. At most two random secrets sign: a rotation within the grace
  period of the one before ends that one's. Once its grace period has ended, the
  previous secret is deleted from Redis by the next node that reads the secrets
  (within :data:`REFRESH_SECONDS` of a delivery or a look at them): a retired secret
  is not kept at rest.

A node that cannot read Redis goes on signing with the secrets it read last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from troth.caas import delivery
from troth.caas.models import MAX_KEEP_PREVIOUS_SECONDS
from troth.core.batcher import Batcher, Command
from troth.core.clock import Clock
from troth.core.scripts import Script, load_lua

log = logging.getLogger(__name__)

#: Seconds a node signs with the secrets it read before it reads them again: the
#: longest a rotation takes to reach every node.
REFRESH_SECONDS = 10.0
#: Secrets a configured principal may list (the current one and those being retired).
MAX_CONFIGURED = 4

_FIELDS = ("current", "previous", "previous_until_ms", "rotated_ms")


@dataclass(frozen=True, slots=True)
class SecretState:
    """A principal's secrets as one node knows them."""

    current: str
    #: Configured secrets (never rotated through the API), newest first, ``current``
    #: included; empty for a random secret.
    configured: tuple[str, ...] = ()
    previous: str | None = None
    previous_until_ms: int | None = None
    rotated_ms: int | None = None

    def signing(self, now_ms: int) -> tuple[str, ...]:
        """The secrets that sign a delivery made at ``now_ms``, newest first."""
        if self.configured:
            return self.configured
        if self.previous and self.previous_until_ms and now_ms < self.previous_until_ms:
            return (self.current, self.previous)
        return (self.current,)


def _state(reply: list[bytes | None]) -> SecretState | None:
    current, previous, until, rotated = (v.decode() if v is not None else None for v in reply)
    if current is None:
        return None
    return SecretState(
        current=current,
        previous=previous,
        previous_until_ms=int(until) if until else None,
        rotated_ms=int(rotated) if rotated else None,
    )


@dataclass(slots=True)
class _Read:
    state: SecretState
    read_at: float  # the loop's time


class SigningSecrets:
    """The secrets of every principal, as this node signs with them. Reads go through
    the engine's :class:`Batcher`, so they never block the event loop."""

    def __init__(
        self, configured: dict[str, list[str]], batcher: Batcher, prefix: str, clock: Clock
    ) -> None:
        self._configured = {
            p: SecretState(current=s[0], configured=tuple(s)) for p, s in configured.items()
        }
        self._batcher = batcher
        self._prefix = prefix
        self._clock = clock
        self._cache: dict[str, _Read] = {}
        self._reads: dict[str, asyncio.Future[SecretState]] = {}
        self._rotate = Script(load_lua("rotate_secret.lua", "troth.caas"))
        self._forget = Script(load_lua("forget_previous.lua", "troth.caas"))

    def _key(self, principal: str) -> str:
        return f"{self._prefix}:signing:{principal}"

    def _legacy_key(self, principal: str) -> str:
        """Where troth kept a principal's random secret before rotation (a string)."""
        return f"{self._prefix}:whsec:{principal}"

    async def state(self, principal: str, fresh: bool = False) -> SecretState:
        """The principal's secrets: configured, else as read within
        :data:`REFRESH_SECONDS` (``fresh``: read now), made on first use. Concurrent
        callers share one read."""
        configured = self._configured.get(principal)
        if configured is not None:
            return configured
        loop = asyncio.get_running_loop()
        cached = self._cache.get(principal)
        if cached is not None and not fresh and loop.time() - cached.read_at < REFRESH_SECONDS:
            return cached.state
        read = self._reads.get(principal)
        if read is None:
            read = self._reads[principal] = asyncio.ensure_future(self._read(principal))
            read.add_done_callback(lambda _: self._reads.pop(principal, None))
            # (its error is taken even if every waiter left: none is logged as unread)
            read.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.shield(read)
        except Exception as exc:
            if cached is None:
                raise
            log.warning(
                "reading %s's signing secrets failed (%s): signing as before", principal, exc
            )
            return cached.state

    async def _read(self, principal: str) -> SecretState:
        loop = asyncio.get_running_loop()
        started = loop.time()
        key = self._key(principal)
        state = await self._stored(principal)
        if state is None:  # the first use: the secret troth kept before, or a new one
            legacy = self._legacy_key(principal)
            (kept,) = await self._batcher.results(lambda c: c.append(("GET", legacy)))
            candidate = kept.decode() if kept is not None else delivery.new_secret()

            def ensure(commands: list[Command]) -> None:
                commands.append(("HSETNX", key, "current", candidate))
                commands.append(("HMGET", key, *_FIELDS))

            _, reply = await self._batcher.results(ensure, 2)
            state = _state(reply)
            assert state is not None
            if kept is not None:  # the hash holds it now
                await self._batcher.results(lambda c: c.append(("DEL", legacy)))
        until = state.previous_until_ms
        if state.previous is not None and (until or 0) <= self._clock.now_ms():
            await self._batcher.results(
                lambda c: self._forget.queue(c, [key], [until or 0]), 1, self._forget
            )
            state = dataclasses.replace(state, previous=None, previous_until_ms=None)
        known = self._cache.get(principal)
        if known is None or known.read_at <= started:  # (not over a rotation made meanwhile)
            self._cache[principal] = _Read(state, loop.time())
        return state

    async def peek(self, principal: str) -> SecretState | None:
        """The principal's secrets as Redis has them now, or None if none was made
        yet: unlike :meth:`state`, a read that makes nothing (for operators looking)."""
        return self._configured.get(principal) or await self._stored(principal)

    async def _stored(self, principal: str) -> SecretState | None:
        key = self._key(principal)
        (reply,) = await self._batcher.results(lambda c: c.append(("HMGET", key, *_FIELDS)))
        return _state(reply)

    async def signing(self, principal: str, now_ms: int) -> tuple[str, ...]:
        """The secrets that sign the principal's delivery made at ``now_ms``."""
        return (await self.state(principal)).signing(now_ms)

    async def rotate(
        self, principal: str, keep_previous_seconds: float, now_ms: int
    ) -> SecretState:
        """A new random secret for ``principal``; the current one goes on signing for
        ``keep_previous_seconds`` (0: it stops at once, e.g. when it leaked). Raises
        ValueError for a configured principal (rotated in the configuration)."""
        if principal in self._configured:
            raise ValueError(
                f"principal {principal!r} has a configured secret: rotate it in "
                "plugins.commitments.signing_secrets (list the new one first)"
            )
        if not 0 <= keep_previous_seconds <= MAX_KEEP_PREVIOUS_SECONDS:
            raise ValueError(f"keep_previous_seconds must be 0 to {MAX_KEEP_PREVIOUS_SECONDS:.0f}")
        await self.state(principal)  # made (or carried over) before it is rotated
        key = self._key(principal)
        until_ms = now_ms + int(keep_previous_seconds * 1000) if keep_previous_seconds else 0
        args = [delivery.new_secret(), now_ms, until_ms, *_FIELDS]
        (reply,) = await self._batcher.results(
            lambda c: self._rotate.queue(c, [key], args), 1, self._rotate
        )
        state = _state(reply)
        assert state is not None
        self._cache[principal] = _Read(state, asyncio.get_running_loop().time())
        return state
