"""The lean HTTP/1.1 client against real servers on 127.0.0.1 that answer exactly as
each test scripts them (raw asyncio servers: the edge cases a framework would hide)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from troth.core.http1 import Http1Client, Response, ResponseError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def loopback(host: str, port: int) -> list[tuple[int, str]]:
    return [(socket.AF_INET, "127.0.0.1")]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body (None at EOF)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


@contextlib.asynccontextmanager
async def serving(handler: Handler, http: Http1Client) -> AsyncIterator[str]:
    """The server's URL; at the end every connection of either side is closed."""
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await handler(reader, writer)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        await http.aclose()
        server.close()
        for writer in writers:
            writer.close()
        await asyncio.sleep(0.05)  # the transports finish closing


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def client(timeout: float = 5, max_response_bytes: int = 65_536) -> Http1Client:
    return Http1Client(
        loopback, timeout=timeout, user_agent="t", max_response_bytes=max_response_bytes
    )


def test_requests_share_one_kept_alive_connection_and_carry_what_was_given() -> None:
    connections = 0
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while (req := await read_request(reader)) is not None:
            seen.append(req)
            writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
        writer.close()

    async def test() -> None:
        http = client()
        async with serving(handler, http) as url:
            for i in range(3):
                resp = await http.request("POST", f"{url}/a b?x=1", b"body%d" % i, {"x-k": "v"})
                assert resp == Response(201, b"ok")

    run(test)
    assert connections == 1
    head, body = seen[2]
    assert head.startswith(b"POST /a%20b?x=1 HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"\r\nx-k: v\r\n" in head and b"\r\nuser-agent: t\r\n" in head
    assert body == b"body2"


def test_a_connection_unused_for_idle_seconds_is_closed_and_one_in_use_is_kept() -> None:
    closed: list[float] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        closed.append(asyncio.get_running_loop().time())  # the client closed it

    async def test() -> None:
        http = Http1Client(loopback, timeout=5, user_agent="t", idle_seconds=0.3)
        async with serving(handler, http) as url:
            first, second = await asyncio.gather(
                http.request("POST", f"{url}/1"), http.request("POST", f"{url}/2")
            )
            assert first.status_code == second.status_code == 200  # two connections
            started = asyncio.get_running_loop().time()
            for _ in range(5):  # one of them stays in use
                await asyncio.sleep(0.1)
                await http.request("POST", f"{url}/again")
            assert len(closed) == 1  # the other, unused for 0.3 s
            assert 0.25 <= closed[0] - started <= 0.45
            await asyncio.sleep(0.5)
            assert len(closed) == 2  # and the last, once unused as long

    run(test)


@pytest.mark.parametrize("repeatable", [True, False])
def test_a_request_the_server_dropped_on_a_kept_alive_connection(repeatable: bool) -> None:
    """The keep-alive race: the server closes a connection it kept open just as the next
    request arrives on it, without a byte of answer. A request that may be repeated goes
    out once more on a new connection, and the caller sees only its answer; any other
    fails (the server may have acted on it)."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n%d" % connections)
        await writer.drain()
        if first:
            await read_request(reader)  # the second request: dropped unanswered
            writer.close()

    async def test() -> None:
        http = client()
        async with serving(handler, http) as url:
            assert await http.request("POST", url, b"1") == Response(200, b"1")
            second = http.request("POST", url, b"2", repeatable=repeatable)
            if repeatable:
                assert await second == Response(200, b"2")
            else:
                with pytest.raises(ConnectionError):
                    await second

    run(test)
    assert connections == (2 if repeatable else 1)


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"abcde",
        ),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil the close", b"until the close"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\ncontent-length: 1\r\n\r\nx", b"x"),
    ],
    ids=["chunked", "close-delimited", "interim-1xx"],
)
def test_response_framings(answer: bytes, body: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        if b"HTTP/1.0" in answer:
            writer.close()

    async def test() -> None:
        http = client()
        async with serving(handler, http) as url:
            resp = await http.request("POST", url, b"")
            assert resp.body == body and resp.status_code in (200, 202)

    run(test)


def test_a_closed_connection_is_freed_at_once() -> None:
    """A connection the server closed (``Connection: close``, HTTP/1.0 receivers) is
    freed by reference counting, not left in a cycle with its parser for the garbage
    collector: a receiver that closes after every delivery would otherwise leave one
    such cycle per delivery."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    def connections() -> int:
        return sum(type(o).__name__ == "_Connection" for o in gc.get_objects())

    async def test() -> None:
        http = client()
        async with serving(handler, http) as url:
            for _ in range(3):
                assert (await http.request("POST", url, b"")).body == b"ok"
            await asyncio.sleep(0.05)  # the transports finish closing
            assert connections() == 0

    gc.collect()
    gc.disable()
    try:
        run(test)
    finally:
        gc.enable()


def test_a_long_body_is_cut_at_the_limit_and_its_connection_not_reused() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 100_000)
            await writer.drain()
        writer.close()

    async def test() -> None:
        http = client(max_response_bytes=1000)
        async with serving(handler, http) as url:
            for _ in range(2):
                assert await http.request("GET", url) == Response(200, b"x" * 1000)

    run(test)
    assert connections == 2


def test_a_response_cut_short_and_garbage_are_errors() -> None:
    answers = [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", b"SMTP ready\r\n\r\n"]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    async def test() -> None:
        http = client()
        async with serving(handler, http) as url:
            with pytest.raises(ResponseError, match="closed before"):
                await http.request("POST", url, b"")
            with pytest.raises(ResponseError, match="malformed"):
                await http.request("POST", url, b"")

    run(test)


def test_a_timed_out_request_is_not_answered_on_the_next_one() -> None:
    """The slow answer to the first request must never be read as the second's."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        n = connections
        while await read_request(reader) is not None:
            if n == 1:
                await asyncio.sleep(0.5)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n%d" % n)
            await writer.drain()

    async def test() -> None:
        http = client(timeout=0.2)
        async with serving(handler, http) as url:
            with pytest.raises(TimeoutError):
                await http.request("POST", url, b"")
            assert await http.request("POST", url, b"") == Response(200, b"2")

    run(test)


@pytest.mark.parametrize("apart", [False, True], ids=["behind-the-answer", "later"])
def test_bytes_a_server_sends_unasked_are_never_an_answer(apart: bool) -> None:
    """A server that sends a response on an idle kept-alive connection (a 408 before it
    closes, a broken proxy) loses that connection: the next request gets its own answer."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        n = connections
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n%d" % n)
            if n == 1:
                if apart:
                    await writer.drain()
                    await asyncio.sleep(0.05)
                writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()

    async def test() -> None:
        http = client()
        async with serving(handler, http) as url:
            assert await http.request("POST", url, b"") == Response(200, b"1")
            await asyncio.sleep(0.1)
            assert await http.request("POST", url, b"") == Response(200, b"2")

    run(test)
    assert connections == 2


def test_what_cannot_be_sent_is_refused_before_connecting() -> None:
    async def nowhere(host: str, port: int) -> list[tuple[int, str]]:
        raise AssertionError("no connection may be opened")

    async def test() -> None:
        http = Http1Client(nowhere, timeout=1, user_agent="t")
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            await http.request("POST", "http://127.0.0.1:9/", b"", {"x-a": "b\r\nevil: 1"})
        with pytest.raises(ValueError, match="method"):
            await http.request("HEAD", "http://127.0.0.1:9/")
        with pytest.raises(ValueError, match="URL"):
            await http.request("GET", "ftp://127.0.0.1/")

    run(test)


def test_refused_connections_are_os_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def test() -> None:
        with pytest.raises(OSError):
            await client().request("POST", f"http://127.0.0.1:{port}/", b"")

    run(test)
