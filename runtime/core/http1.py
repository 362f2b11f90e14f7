"""A lean HTTP/1.1 client for the node's hot path: one request out, one response in.

Why not aiohttp's client: on this project's benchmark machine it spent about 300 µs
of CPU per POST (request and response objects, cookie jar, trace hooks, multidict
headers) where a commitment's whole delivery costs about 800 µs. This client writes
a request as one buffer and parses the response with httptools (llhttp, the parser
uvicorn uses): about 85 µs. It does only what a webhook sender needs:

* keep-alive connections per origin (scheme, host, port), reused while the server
  keeps them open and closed after ``idle_seconds`` unused; at most
  ``max_connections`` requests in flight;
* where a connection goes is the caller's decision: ``resolve`` returns the
  addresses it checked, and the client connects to those only (TLS still verifies
  the host name);
* a response body is kept up to ``max_response_bytes``; a longer one is cut there
  and its connection closed;
* ``timeout`` bounds a request from its first byte to the last of its response,
  connecting included; a timed-out connection is closed, never reused;
* a request sent on a reused connection that the server closed before a byte of a
  response came (the race every keep-alive client has with a server's idle
  timeout) is sent once more on a new connection, but only when the caller says it
  may be repeated (``repeatable``: the server may have acted on it before closing);
  otherwise that is an error, as with any lost connection;
* no redirects, cookies, proxies or compression (nothing is asked for, so nothing
  comes back encoded).

Errors: :class:`OSError` (connection refused or lost, :class:`ResponseError` for a
response that is malformed or cut short), :class:`TimeoutError`, and whatever
``resolve`` raises, unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httptools

from troth.core import tracing
from troth.core.aio import Slots

#: ``resolve(host, port)``: the (family, address) pairs a connection may go to.
Resolve = Callable[[str, int], Awaitable[list[tuple[int, str]]]]


async def resolve_any(host: str, port: int) -> list[tuple[int, str]]:
    """Every address of ``host``, unchecked: for peers the node trusts (other nodes)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [(int(info[0]), str(info[4][0])) for info in infos]
    return [(socket.AF_INET6 if address.version == 6 else socket.AF_INET, str(address))]


_BODYLESS = frozenset({"HEAD", "CONNECT"})
_PATH_SAFE = "/%:@!$&'()*+,;=-._~?"
_UNSAFE = re.compile(r"[\r\n\0]")


@dataclass(frozen=True, slots=True)
class Response:
    status_code: int
    body: bytes


class ResponseError(ConnectionError):
    """The server's answer was not a complete HTTP/1.1 response."""


class _Stale(ConnectionError):
    """A reused connection was closed by the server before any response byte came."""


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    head: bytes  # the request line and the Host header


@functools.lru_cache(maxsize=4096)
def _target(method: str, url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an absolute http(s) URL: {url!r}")
    if method.upper() in _BODYLESS or not method.isalpha():
        raise ValueError(f"unsupported HTTP method {method!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PATH_SAFE)
    netloc = parts.netloc.rpartition("@")[2]
    host_header = netloc if netloc.isascii() else netloc.encode("idna").decode()
    head = f"{method.upper()} {path} HTTP/1.1\r\nhost: {host_header}\r\n".encode()
    return _Target(parts.scheme, parts.hostname, port, head)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection, one request at a time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.reused = False
        #: ``loop.time()`` when it was last put back unused.
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.body: list[bytes] = []
        self.size = 0
        self.status = 0
        self.got_data = False
        self.delimited = False  # Content-Length or chunked: the end is known
        self.keep = True

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def send(self, data: bytes, deadline: float) -> Response:
        """The response to ``data``, by ``deadline`` (``loop.time()``): a timer fails
        the wait then (a third of ``asyncio.timeout``'s cost, on every request)."""
        assert self.transport is not None
        self._reset()
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        expiry = loop.call_at(deadline, self._expire)
        self.transport.write(data)
        try:
            return await self.waiter
        except BaseException:  # timed out, cancelled or failed: never reused
            self.close()
            raise
        finally:
            expiry.cancel()

    def _expire(self) -> None:
        self._finish(TimeoutError("no complete response in time"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _finish(self, result: Response | BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        if isinstance(result, BaseException):
            waiter.set_exception(result)
        else:
            waiter.set_result(result)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # unasked for (a server's 408 before it closes): never
            self.close()  # read as the answer to the next request, nor reused
            return
        self.got_data = True
        assert self.parser is not None  # no data after connection_lost
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()
            self._finish(ResponseError(f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.parser = None  # it calls back into this object: unlinked, both are freed at once
        if self.waiter is None:
            return
        if self.status >= 200 and not self.delimited:  # the body ran until the close
            self._finish(Response(self.status, b"".join(self.body)))
        elif not self.got_data and self.reused:
            self._finish(_Stale("the server closed the kept-alive connection"))
        else:
            self._finish(ResponseError(f"connection closed before the response ended: {exc}"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value):
            self.delimited = True

    def on_headers_complete(self) -> None:
        if self.waiter is None:  # a second response behind the answer: unasked for
            self.close()
        assert self.parser is not None
        self.status = self.parser.get_status_code()

    def on_body(self, chunk: bytes) -> None:
        room = self.limit - self.size
        self.size += len(chunk)
        if room > 0:
            self.body.append(chunk[:room])
        if self.size > self.limit:  # enough: the rest is not read
            self.keep = False
            self.close()
            self._finish(Response(self.status, b"".join(self.body)))

    def on_message_complete(self) -> None:
        if self.status < 200:  # 1xx: an interim response; the final one follows
            self._reset()
            self.got_data = True  # the server did answer: a loss now is no stale reuse
            return
        assert self.parser is not None
        self.keep = self.keep and self.parser.should_keep_alive()
        self._finish(Response(self.status, b"".join(self.body)))


class Http1Client:
    """Requests over kept-alive HTTP/1.1 connections (see the module docstring). Bound
    to the event loop that first uses it."""

    def __init__(
        self,
        resolve: Resolve,
        *,
        timeout: float,
        user_agent: str,
        max_connections: int = 256,
        max_response_bytes: int = 65_536,
        idle_seconds: float = 5.0,
    ) -> None:
        self.resolve = resolve
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.idle_seconds = idle_seconds
        self.max_connections = max_connections
        self._agent = f"user-agent: {user_agent}\r\n".encode()
        #: Unused connections per origin, the longest unused first.
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        #: One timer closes what stayed unused for ``idle_seconds`` (not one timer a
        #: connection, set and cancelled at every request).
        self._sweeper: asyncio.TimerHandle | None = None
        self._slots = Slots(max_connections)
        self._tls: ssl.SSLContext | None = None

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        repeatable: bool = False,
    ) -> Response:
        """Send one request and read its response within ``timeout`` seconds (the
        client's when None); ValueError for a URL, method or header that cannot be
        sent. ``repeatable``: the request may reach the server twice (see the module
        docstring). The ``traceparent`` of the current span goes along while tracing
        is on."""
        target = _target(method, url)
        headers = headers or {}
        trace = tracing.traceparent()
        if trace is not None:
            headers = {**headers, "traceparent": trace}
        if _UNSAFE.search("".join(headers) + "".join(headers.values())):
            raise ValueError("a header name or value contains CR, LF or NUL")
        lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
        length = b"" if body is None else b"content-length: %d\r\n" % len(body)
        data = b"".join(
            (target.head, self._agent, length, lines.encode("latin-1"), b"\r\n", body or b"")
        )
        slots = self._slots
        if not slots.take_now():
            await slots.take()
        try:
            deadline = asyncio.get_running_loop().time() + (timeout or self.timeout)
            conn = self._take(target)
            if conn is not None:
                try:
                    return self._release(target, conn, await conn.send(data, deadline))
                except _Stale:
                    if not repeatable:
                        raise
            async with asyncio.timeout_at(deadline):  # connecting: rare, on kept-alive ones
                conn = await self._connect(target)
            return self._release(target, conn, await conn.send(data, deadline))
        finally:
            slots.give()

    def _take(self, target: _Target) -> _Connection | None:
        idle = self._idle.get((target.scheme, target.host, target.port))
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be open still
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    def _release(self, target: _Target, conn: _Connection, resp: Response) -> Response:
        if conn.keep and not conn.closed:
            idle = self._idle.setdefault((target.scheme, target.host, target.port), [])
            if len(idle) < self.max_connections:
                loop = asyncio.get_running_loop()
                conn.idle_since = loop.time()
                idle.append(conn)
                if self._sweeper is None:
                    self._sweeper = loop.call_at(conn.idle_since + self.idle_seconds, self._sweep)
                return resp
        conn.close()
        return resp

    def _sweep(self) -> None:
        """Close the connections unused for ``idle_seconds``; come back when the next
        one will have been, if any is left."""
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.idle_seconds
        earliest: float | None = None
        for idle in self._idle.values():
            expired = 0
            while expired < len(idle) and idle[expired].idle_since <= cutoff:
                idle[expired].close()
                expired += 1
            del idle[:expired]
            if idle and (earliest is None or idle[0].idle_since < earliest):
                earliest = idle[0].idle_since
        self._sweeper = None
        if earliest is not None:
            self._sweeper = loop.call_at(earliest + self.idle_seconds, self._sweep)

    async def _connect(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if target.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        error: OSError | None = None
        for family, address in await self.resolve(target.host, target.port):
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.max_response_bytes),
                    address,
                    target.port,
                    family=family,
                    proto=socket.IPPROTO_TCP,
                    ssl=tls,
                    server_hostname=target.host if tls else None,
                )
            except OSError as exc:
                error = exc
                continue
            return conn
        raise error or OSError(f"no address to connect to for {target.host!r}")

    async def aclose(self) -> None:
        """Close every idle connection (those in flight close when they end)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
