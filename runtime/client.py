"""The troth client library: call actors and receive their notifications.

::

    from troth.client import Client

    with Client(["http://127.0.0.1:8700", "http://127.0.0.1:8701"]) as client:
        counter = client.actor("counter", "alice-c1")
        counter.increment(2)                      # -> 2, or raises troth.AppError
        client.subscribe("counter/alice-c1", print)

:class:`AsyncClient` is the same API with ``await``; :class:`Client` runs one on a
private event loop thread.

Guarantees:

* every call carries a ``request_id``; when the connection breaks or the call
  fails retryably (the actor is moving, a node died), the client reconnects (to
  any node it knows, including those the cluster announced in ``hello``) and
  resends the call with the **same** ``request_id``: the actor applies it once;
* a call gives up after its ``timeout`` (default 30 s) with :class:`CallTimeout`,
  which says how many attempts were made; the call may still have committed, and
  retrying it with the same ``request_id`` tells its outcome without re-running it;
* notifications of a subscribed actor arrive in commit order, each once, across
  reconnects: the client resumes the subscription after the last id it saw;
* calls made at once share the session, in flight together (up to 1,000): those
  made during one turn of the event loop while others are in flight go out in one
  frame, a batch (:mod:`troth.core.frames`), to a node that takes batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from troth.core import frames
from troth.core.aio import LoopThread, Slots
from troth.core.errors import CallTimeout, RetryableError, TrothError, error_from_dict
from troth.core.names import ActorName, check_method

log = logging.getLogger(__name__)

RETRY_START = 0.05
RETRY_MAX = 1.0
#: Calls one session keeps in flight (a node refuses more from one session).
MAX_INFLIGHT = 1000

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class CallOptions:
    """How to call, apart from what to call: never passed to the actor."""

    #: Seconds to wait for the reply across retries (default: the client's timeout).
    timeout: float | None = None
    #: Sent with every attempt; a repeated id returns the committed reply and runs
    #: nothing (default: a fresh id per call).
    request_id: str | None = None


def actor_address(actor: str | type[Any], actor_id: str | None, type_name: str | None) -> str:
    """``TYPE/ID`` from any of the ways :meth:`AsyncClient.actor` accepts."""
    if isinstance(actor, str):
        address = actor if actor_id is None else f"{actor}/{actor_id}"
    else:
        if actor_id is None:
            raise ValueError("a typed proxy needs the actor's id: actor(Counter, 'alice-c1')")
        address = f"{type_name or actor.__name__.lower()}/{actor_id}"
    return str(ActorName.parse(address))


@functools.lru_cache(maxsize=4096)
def _check(actor: str, method: str) -> None:
    """Refuse a malformed actor or method name (the checks the node makes first);
    remembered for the names that passed, which a client calls again and again."""
    ActorName.parse(actor)
    check_method(method)


@dataclass(frozen=True, slots=True)
class Notification:
    actor: str
    id: str
    data: Any


def _nid(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class _Subscription:
    actor: str
    last: str = "0-0"
    queue: asyncio.Queue[Notification] = field(default_factory=asyncio.Queue)


class AsyncClient:
    """A session with a troth cluster over WebSocket; reconnects on its own."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one node URL is needed")
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._known = list(self.urls)
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._subs: dict[str, _Subscription] = {}
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._ids = itertools.count()
        # request ids this client makes up: random for this client, then a counter
        self._id_prefix = f"{uuid.uuid4().hex}-"
        #: At most as many calls in flight as a node takes from one session.
        self._inflight = Slots(MAX_INFLIGHT)
        self.reconnects = -1  # connections made beyond the first
        #: The node takes batch frames of up to this many bytes (its ``hello`` says
        #: so); 0: one call a frame.
        self._batch_bytes = 0
        #: Calls waiting for the next batch frame, with their replies' futures.
        self._outgoing: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the session (waits up to ``timeout`` for a node to answer)."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self._connected.wait(), self.timeout)
        except TimeoutError:
            await self.close()
            raise CallTimeout(f"no troth node reachable at {self._known}") from None

    async def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    @overload
    def actor(self, actor: str, actor_id: str | None = None) -> AsyncActor[Any]: ...

    @overload
    def actor(
        self, actor: type[T], actor_id: str, *, type_name: str | None = None
    ) -> AsyncActor[T]: ...

    def actor(
        self, actor: str | type[Any], actor_id: str | None = None, *, type_name: str | None = None
    ) -> AsyncActor[Any]:
        """A proxy of one actor: ``actor("counter/alice-c1")``, ``actor("counter",
        "alice-c1")``, or typed, ``actor(Counter, "alice-c1")`` (see :class:`AsyncActor`)."""
        return AsyncActor(self, actor_address(actor, actor_id, type_name), CallOptions())

    async def call(self, actor: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method(*args, **kwargs)`` on ``actor`` (``TYPE/ID``): every keyword
        goes to the method. Options (timeout, request id) go through
        :meth:`call_with` or ``actor(...).with_options(...)``."""
        return await self.call_with(CallOptions(), actor, method, list(args), kwargs)

    async def call_with(
        self,
        options: CallOptions,
        actor: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        """Call with explicit options; see the module docstring for the guarantees."""
        _check(actor, method)  # refused here, before anything is sent
        if self._runner is None:
            await self.connect()
        request_id = options.request_id or f"{self._id_prefix}{next(self._ids)}"
        # an id made up here is new on the first attempt: the node looks up no reply
        made_here = options.request_id is None
        timeout = options.timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        backoff = RETRY_START
        attempts = 0
        last_error: str = "not connected"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CallTimeout(
                    f"{actor}.{method}: no reply within {timeout or self.timeout}s after "
                    f"{attempts} attempt(s) (last: {last_error}); it may still commit: retry "
                    f"with request_id={request_id!r} to learn its outcome"
                )
            try:
                # (asyncio.timeout rather than wait_for, which makes a task of each wait)
                async with asyncio.timeout(remaining):
                    if not self._connected.is_set():
                        await self._connected.wait()
                    attempts += 1
                    inflight = self._inflight
                    if not inflight.take_now():
                        await inflight.take()
                    try:
                        reply = await self._request(
                            actor, method, args, kwargs, request_id, made_here and attempts == 1
                        )
                    finally:
                        inflight.give()
            except TimeoutError:
                continue
            except (ConnectionError, WebSocketException) as exc:
                last_error = f"connection lost: {exc!r}"
            else:
                if reply["op"] == "reply":
                    return reply["result"]
                err = error_from_dict(reply.get("error", {}))
                # A node's own timeout leaves the outcome open: asking again under the
                # same request id learns it (or runs the call, once).
                if not isinstance(err, RetryableError | CallTimeout):
                    raise err
                last_error = str(err)
            await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
            backoff = min(RETRY_MAX, backoff * 2)

    async def _request(
        self,
        actor: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        request_id: str,
        first: bool,
    ) -> dict[str, Any]:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        call_id = f"c{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[call_id] = fut
        op = {
            "op": "call",
            "id": call_id,
            "actor": actor,
            "method": method,
            "args": args,
            "kwargs": kwargs,
            "request_id": request_id,
            "first": first,
        }
        try:
            if self._batch_bytes and len(self._replies) > 1:  # others in flight: batch
                self._outgoing.append((json.dumps(op), fut))
                if self._flusher is None:
                    self._flusher = asyncio.create_task(self._flush())
            else:  # (a lone call: no batch to wait for)
                await ws.send(json.dumps(op))
            return await fut
        finally:
            self._replies.pop(call_id, None)

    async def _flush(self) -> None:
        """Send the calls made during one turn of the event loop together, in batch
        frames (:mod:`troth.core.frames`): one frame for all of them, or as few as fit
        in what the node takes; then those made while these were being written."""
        try:
            while self._outgoing:
                calls = [(text, fut) for text, fut in self._outgoing if not fut.done()]
                self._outgoing = []
                try:
                    ws = self._ws
                    if ws is None:
                        raise ConnectionError("not connected")
                    for frame in frames.join([text for text, _ in calls], self._batch_bytes):
                        await ws.send(frame)
                except (ConnectionError, WebSocketException) as exc:  # their callers retry
                    for _, fut in calls:
                        if not fut.done():
                            fut.set_exception(exc)
        finally:
            self._flusher = None

    async def notifications(self, actor: str, since: str = "0-0") -> AsyncIterator[Notification]:
        """Committed notifications of ``actor`` after ``since``, forever, in order, once."""
        sub = self._subs.get(actor)
        if sub is None:
            sub = self._subs[actor] = _Subscription(actor, since)
            if self._ws is not None:
                await self._send_subscribe(self._ws, sub)
        while True:
            yield await sub.queue.get()

    async def _send_subscribe(self, ws: ClientConnection, sub: _Subscription) -> None:
        await ws.send(json.dumps({"op": "subscribe", "actor": sub.actor, "since": sub.last}))

    # -- the connection loop ------------------------------------------------------------

    async def _run(self) -> None:
        backoff = RETRY_START
        while not self._closed:
            ws = await self._open()
            if ws is None:
                await asyncio.sleep(backoff)
                backoff = min(RETRY_MAX, backoff * 2)
                continue
            backoff = RETRY_START
            self._ws = ws
            self.reconnects += 1
            try:
                for sub in self._subs.values():
                    await self._send_subscribe(ws, sub)
                self._connected.set()
                async for raw in ws:
                    msg = json.loads(raw)
                    if isinstance(msg, list):
                        for one in msg:
                            self._dispatch(one)
                    else:
                        self._dispatch(msg)
            except (ConnectionError, WebSocketException, OSError) as exc:
                log.info("troth session lost: %r", exc)
            finally:
                self._connected.clear()
                self._ws = None
                for fut in self._replies.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("session lost"))
                        fut.exception()  # its caller may have stopped waiting: no warning

    async def _open(self) -> ClientConnection | None:
        candidates = list(dict.fromkeys(self._known))
        random.shuffle(candidates)
        headers = {"authorization": f"Bearer {self.token}"} if self.token else None
        for url in candidates:
            ws_url = url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/ws"
            try:
                ws = await asyncio.wait_for(
                    connect(ws_url, additional_headers=headers, max_size=16 * 2**20),
                    self.connect_timeout,
                )
            except (OSError, TimeoutError, WebSocketException) as exc:
                log.debug("cannot connect to %s: %r", url, exc)
                continue
            hello = json.loads(await ws.recv())
            self._batch_bytes = int(hello.get("batch_bytes", 0))
            self._known = list(dict.fromkeys([*self.urls, *hello.get("nodes", [])]))
            return ws
        return None

    def _dispatch(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op in ("reply", "error"):
            fut = self._replies.get(str(msg.get("id")))
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif op == "error":
                log.warning("troth session error: %s", msg.get("error"))
        elif op == "notify":
            sub = self._subs.get(msg["actor"])
            if sub is not None and _nid(msg["nid"]) > _nid(sub.last):
                sub.last = msg["nid"]
                sub.queue.put_nowait(Notification(msg["actor"], msg["nid"], msg["data"]))


class AsyncActor(Generic[T]):
    """A proxy of one actor for :class:`AsyncClient`.

    ``await proxy.increment(2)`` calls by name (any method, unchecked). ``await
    proxy.call(Counter.increment, by=2)`` calls through the class: with a proxy made
    as ``client.actor(Counter, "alice-c1")``, mypy and editors check the method's
    arguments and result type (ParamSpec). ``proxy.with_options(timeout=5,
    request_id="...")`` returns a proxy whose calls use those options; the options
    never reach the actor.
    """

    def __init__(self, client: AsyncClient, name: str, options: CallOptions) -> None:
        self._client = client
        self._name = name
        self._options = options

    @property
    def address(self) -> str:
        return self._name

    def with_options(
        self, *, timeout: float | None = None, request_id: str | None = None
    ) -> AsyncActor[T]:
        return AsyncActor(self._client, self._name, CallOptions(timeout, request_id))

    @overload
    async def call(
        self,
        method: Callable[Concatenate[T, P], Coroutine[Any, Any, R]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R: ...

    @overload
    async def call(
        self, method: Callable[Concatenate[T, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R: ...

    async def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self._client.call_with(
            self._options, self._name, method.__name__, list(args), kwargs
        )

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)

        async def invoke(*args: Any, **kwargs: Any) -> Any:
            return await self._client.call_with(
                self._options, self._name, method, list(args), kwargs
            )

        return invoke


class Client:
    """The synchronous client: an :class:`AsyncClient` on a private event loop thread."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._io = LoopThread("troth-client")
        self.timeout = timeout

        async def make() -> AsyncClient:
            c = AsyncClient(urls, token=token, timeout=timeout, connect_timeout=connect_timeout)
            await c.connect()
            return c

        try:
            self._async = self._io.submit(make()).result(timeout + 5)
        except BaseException:
            self._io.stop()
            raise
        self._listeners: list[Any] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reconnects(self) -> int:
        return self._async.reconnects

    def call(self, actor: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method(*args, **kwargs)`` on ``actor``; every keyword goes to it."""
        return self.call_with(CallOptions(), actor, method, list(args), kwargs)

    def call_with(
        self,
        options: CallOptions,
        actor: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        coro = self._async.call_with(options, actor, method, args, kwargs)
        return self._io.submit(coro).result((options.timeout or self.timeout) + 5)

    @overload
    def actor(self, actor: str, actor_id: str | None = None) -> Actor[Any]: ...

    @overload
    def actor(self, actor: type[T], actor_id: str, *, type_name: str | None = None) -> T: ...

    def actor(
        self, actor: str | type[Any], actor_id: str | None = None, *, type_name: str | None = None
    ) -> Any:
        """A proxy of one actor. Typed, ``client.actor(Counter, "alice-c1")`` is seen by
        mypy and editors as a ``Counter``: ``.increment(by=2)`` is checked against the
        class (the call still goes over the network). The type name defaults to the
        class name in lower case; give ``type_name`` when it is registered otherwise."""
        return Actor(self, actor_address(actor, actor_id, type_name), CallOptions())

    def subscribe(
        self, actor: str, callback: Callable[[Notification], None], since: str = "0-0"
    ) -> None:
        """Call ``callback`` (on the client's thread) for each notification, in order."""

        async def listen() -> None:
            async for note in self._async.notifications(actor, since):
                try:
                    callback(note)
                except Exception:
                    log.exception("notification callback for %s failed", actor)

        self._listeners.append(self._io.submit(listen()))

    def close(self) -> None:
        for fut in self._listeners:
            fut.cancel()
        with contextlib.suppress(Exception):
            self._io.submit(self._async.close()).result(10)
        self._io.stop()


class Actor(Generic[T]):
    """``client.actor("counter/alice-c1").increment(2)``; see :meth:`Client.actor`."""

    def __init__(self, client: Client, name: str, options: CallOptions) -> None:
        self._client = client
        self._name = name
        self._options = options

    @property
    def address(self) -> str:
        return self._name

    def with_options(self, *, timeout: float | None = None, request_id: str | None = None) -> Any:
        """This proxy with call options (never passed to the actor)."""
        return Actor(self._client, self._name, CallOptions(timeout, request_id))

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)

        def invoke(*args: Any, **kwargs: Any) -> Any:
            return self._client.call_with(self._options, self._name, method, list(args), kwargs)

        return invoke


__all__ = [
    "Actor",
    "AsyncActor",
    "AsyncClient",
    "CallOptions",
    "CallTimeout",
    "Client",
    "Notification",
    "TrothError",
]
