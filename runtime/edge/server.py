"""Running a node with its HTTP API: in the foreground (``troth serve``) or in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any, cast

import uvicorn
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from uvicorn.protocols.http.h11_impl import H11Protocol

from troth.core.config import Config, ConfigError, NodeConfig
from troth.edge.admin_api import admin_router
from troth.edge.http_api import create_app, is_loopback_host
from troth.edge.notify_hub import NotificationHub
from troth.edge.sessions import SessionServer
from troth.node import Node

log = logging.getLogger(__name__)


def bind(host: str, port: int, config: Config) -> socket.socket:
    """Bind the API socket; a non-loopback address requires API keys."""
    if not is_loopback_host(host) and not config.auth.api_keys:
        raise ConfigError(
            f"refusing to bind {host}: no API keys are configured (auth.api_keys); "
            "bind 127.0.0.1 or configure keys"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says TCP, and without it every kept-alive response waits for
    # the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after it stops, which would kill the process
    before the node's graceful stop (drain, release leases) runs; troth handles the
    signals itself instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _HeadTimeout:
    """A deadline for each request head, mixed into uvicorn's HTTP/1.1 protocol: a
    client that opens a connection (or starts a new request on a kept-alive one) and
    does not finish sending its headers in time is disconnected (no slowloris).

    One timer a connection, moved along when a response completes, rather than one
    a request: at thousands of requests a second those were tens of thousands of
    timers pending on the loop."""

    head_timeout = 10.0
    cycle: object
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _head_timer: asyncio.TimerHandle | None = None
    _head_waiting: tuple[object, float]  # (the cycle then current, deadline)

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._head_waiting = (self.cycle, self.loop.time() + self.head_timeout)
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_waiting[1], self._head_deadline)

    def _head_deadline(self) -> None:
        self._head_timer = None
        waiting_for, deadline = self._head_waiting
        if self.cycle is not waiting_for:
            return  # a request is under way; its response arms the timer again
        if self.loop.time() < deadline:  # a later response moved the deadline
            self._head_timer = self.loop.call_at(deadline, self._head_deadline)
            return
        transport = self.transport
        if not transport.is_closing() and transport.get_protocol() is cast(object, self):
            transport.close()  # (a connection upgraded to a WebSocket is not ours)


class _OneWrite:
    """A response's view of its connection: the head uvicorn writes at
    ``http.response.start`` waits for the first body bytes, so that a small response
    leaves in one write (one syscall, one TCP segment for the client to take) and not
    two. A head whose body does not follow in the same turn of the event loop (a
    streamed response) leaves at the end of that turn; nothing is ever held longer,
    and a close sends what is held first."""

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(b"HTTP/"):  # the head
            self._held = data
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()


class _Coalescing:
    """Mixed into uvicorn's httptools protocol: each request's response cycle writes
    through :class:`_OneWrite` (the connection itself, and a WebSocket it is upgraded
    to, keep the plain transport)."""

    cycle: Any

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()  # type: ignore[misc]
        if self.cycle is not before:  # a request (not an upgrade to a WebSocket)
            self.cycle.transport = _OneWrite(self.cycle.transport)


def _http_protocol() -> tuple[type, ...]:
    """uvicorn's fastest HTTP/1.1 protocol here: httptools (C) when installed, its
    responses written whole (:class:`_Coalescing`); else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return (H11Protocol,)
    return (_Coalescing, HttpToolsProtocol)


def node_app(node: Node, sessions: SessionServer) -> FastAPI:
    """The HTTP face of ``node``: its own routes, its extensions', the operators' API
    and the console (``/ui``, static files: the data comes from ``/v1/admin``)."""
    routes = [r for ext in node.extensions if (r := ext.routes(node.context)) is not None]
    app = create_app(
        config=node.config,
        router=node.router,
        sessions=sessions,
        health_probe=node.health,
        node_metrics=node.metrics,
        routes=[*routes, admin_router(node)],
    )

    @app.get("/ui", include_in_schema=False)
    async def console() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount(
        "/ui",
        StaticFiles(packages=[("troth.edge", "console")], html=True, follow_symlink=True),
        name="ui",
    )
    return app


def _uvicorn(app: FastAPI, cfg: NodeConfig) -> uvicorn.Server:
    protocol = type(
        "HeadTimeoutHTTP",
        (_HeadTimeout, *_http_protocol()),
        {"head_timeout": cfg.header_timeout_seconds},
    )
    return _Server(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            # No X-Forwarded-* rewriting: nothing here reads the client's address, and
            # uvicorn's middleware for it costs every request.
            proxy_headers=False,
            # No "server: uvicorn" header: it tells a scanner what runs here, and each
            # header costs every response uvicorn's checks.
            server_header=False,
            http=protocol,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=int(max(1, cfg.keep_alive_seconds)),
            limit_concurrency=cfg.max_connections,
            ws_max_size=cfg.max_body_bytes,
            # Session frames are small JSON: compressing them cost more CPU than it
            # saved bytes (on both ends; zlib also keeps a context per connection).
            ws_per_message_deflate=False,
        )
    )


def serve_forever(
    config: Config,
    redis_url: str,
    host: str,
    port: int,
    node_id: str | None = None,
) -> None:
    """Start a node and its API; return after SIGINT/SIGTERM and a graceful stop."""
    sock = bind(host, port, config)
    node = Node(config, redis_url, node_id)
    bound = sock.getsockname()[1]
    node.url = config.node.public_url or f"http://{host}:{bound}"
    node.start()
    server = ServerThread(node, sock=sock).start()
    tune_gc()
    print(f"troth node {node.node_id} listening on {node.url} (redis {redis_url})", flush=True)
    stop = threading.Event()

    def shutdown(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping node %s", signum, node.node_id)
        stop.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        while not stop.wait(0.5) and server.running:
            pass
    finally:
        server.stop()
        node.stop()


#: Allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a serving node (``troth serve``).

    Every request allocates objects, and with CPython's defaults a full collection,
    which walks every object of the process (the web framework's, the schemas', the
    actors'), runs every ~70,000 allocations: measured here, that halved a node's
    throughput and held about 1 request in 20 for 200-300 ms. So the objects made at
    start-up are frozen (never scanned again), and the young generation collects
    after 50,000 allocations instead of 700. Cyclic garbage is still collected, just
    less often; an embedding program keeps its own settings (this is called by
    ``troth serve`` only).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)


class ServerThread:
    """A node's HTTP API, served by uvicorn on the node's own event loop (so a call
    goes from the socket to the actor and back without changing threads)."""

    def __init__(
        self,
        node: Node,
        host: str = "127.0.0.1",
        port: int = 0,
        sock: socket.socket | None = None,
    ) -> None:
        self.node = node
        self.sock = sock or bind(host, port, node.config)
        bound_host, bound_port = self.sock.getsockname()[:2]
        self.url = f"http://{host if sock is None else bound_host}:{bound_port}"
        node.url = node.url or self.url
        runtime = node.config.runtime
        hub = NotificationHub(
            node.redis_url,
            runtime.max_subscriptions,
            node.config.redis.timeout_seconds,
            node.batcher if node.cluster else None,
        )
        self.sessions = SessionServer(
            node.router, hub, node.metrics, runtime.max_sessions, node.config.node.max_body_bytes
        )
        self.server = _uvicorn(node_app(node, self.sessions), node.config.node)
        self._serving: Future[None] | None = None

    @property
    def running(self) -> bool:
        return self._serving is not None and not self._serving.done()

    def start(self) -> ServerThread:
        self._serving = asyncio.run_coroutine_threadsafe(
            self.server.serve(sockets=[self.sock]), self.node.loop
        )
        while not self.server.started and not self._serving.done():
            threading.Event().wait(0.01)
        if self._serving.done():
            self._serving.result()  # raises what stopped it
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._serving is not None:
            with contextlib.suppress(Exception):
                self._serving.result(timeout=10)
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.sessions.close(), self.node.loop).result(5)
        self.sock.close()
