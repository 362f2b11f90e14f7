"""The client library: call options apart from method arguments, typed proxies,
batch frames."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mypy import api as mypy_api
from websockets.asyncio.server import ServerConnection, serve
from websockets.sync.client import connect

from examples.helloworld.counter import AsyncCounter, Counter
from troth.client import AsyncClient, Client
from troth.node import Node


def test_call_options_never_reach_the_actor(make_node: Callable[..., Node]) -> None:
    node = make_node("n1", serve=True)
    with Client(node.url) as client:
        probe = client.actor("probe/alice-o")
        first = probe.with_options(timeout=7, request_id="rid-1").wait(
            timeout=2.5, request_id="the actor's own"
        )
        assert first == {"timeout": 2.5, "request_id": "the actor's own", "waits": 1}
        # the option was the call's request id: a repeat returns the committed reply
        again = probe.with_options(request_id="rid-1").wait(timeout=9)
        assert again == first
        assert client.call("probe/alice-o", "wait", timeout=3)["waits"] == 2
        assert client.actor(Counter, "alice-t").increment(by=2) == 2


def test_a_first_attempt_skips_the_replay_look_up_and_a_repeat_does_not(
    make_node: Callable[..., Node],
) -> None:
    """``first`` on a WebSocket call says its request id was made up for this very
    attempt: the node looks up no committed reply for it (the client library sets it
    on the first attempt of an id it made, never on a retry). Without it a repeated
    request id gets the committed reply, the call not run again."""
    node = make_node("n1", serve=True)

    def dedup_hits() -> float:
        return node.metrics.registry.get_sample_value("troth_request_dedup_hits_total") or 0.0

    with connect(node.url.replace("http://", "ws://") + "/v1/ws") as ws:
        json.loads(ws.recv())  # hello

        def call(first: bool) -> object:
            op = {"op": "call", "id": "c", "actor": "counter/alice-f", "method": "increment"}
            ws.send(json.dumps({**op, "request_id": "r1", "first": first}))
            reply = json.loads(ws.recv())
            assert reply["op"] == "reply", reply
            return reply["result"]

        assert call(first=True) == 1
        assert dedup_hits() == 0
        assert call(first=False) == 1  # the retry of an attempt that committed: its reply
        assert dedup_hits() == 1
        assert call(first=True) == 2  # told the id is new: not looked up, run again
        assert dedup_hits() == 1
    with Client(node.url) as client:  # the library's own ids: each call runs once
        assert [client.call("counter/alice-f", "increment") for _ in range(3)] == [3, 4, 5]
    assert dedup_hits() == 1


def test_async_typed_proxy_calls_through_the_class(make_node: Callable[..., Node]) -> None:
    node = make_node(
        "n1",
        serve=True,
        types={"asynccounter": {"class": "examples.helloworld.counter:AsyncCounter"}},
    )

    async def run() -> tuple[int, int]:
        async with AsyncClient(node.url) as client:
            counter = client.actor(AsyncCounter, "alice-a")
            one: int = await counter.call(AsyncCounter.increment, by=3)
            two: int = await counter.with_options(timeout=5).call(AsyncCounter.get)
            return one, two

    assert asyncio.run(run()) == (3, 3)


@pytest.mark.slow
def test_typed_proxies_are_checked_by_mypy(tmp_path: Path) -> None:
    source = tmp_path / "typed_use.py"
    source.write_text(
        "from examples.helloworld.counter import AsyncCounter, Counter\n"
        "from troth.client import AsyncClient, Client\n"
        "\n"
        "def sync(c: Client) -> int:\n"
        "    return c.actor(Counter, 'alice-c1').increment(by=2)\n"
        "\n"
        "async def asynchronous(c: AsyncClient) -> int:\n"
        "    return await c.actor(AsyncCounter, 'alice-c1').call(AsyncCounter.increment, by=2)\n"
        "\n"
        "def wrong(c: Client, a: AsyncClient) -> None:\n"
        "    c.actor(Counter, 'alice-c1').increment(by='two')\n"
        "    a.actor(Counter, 'x').call(Counter.increment, bye=2)\n"
    )
    out, _, status = mypy_api.run(
        [str(source), "--no-incremental", "--ignore-missing-imports", "--follow-imports=silent"]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1, out
    assert len(errors) == 2, out
    assert all("typed_use.py:11" in e or "typed_use.py:12" in e for e in errors), out


async def _calls_through_a_stand_in_node(hello: dict[str, Any], calls: int) -> list[str]:
    """``calls`` calls at once through one AsyncClient, to a WebSocket server on
    127.0.0.1 that greets with ``hello`` and answers each call with its argument (as
    it came: one object, or a batch); returns the frames the client sent."""
    frames: list[str] = []

    async def node(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"op": "hello", "node": "stand-in", "nodes": [], **hello}))
        async for raw in ws:
            assert isinstance(raw, str)
            frames.append(raw)
            message = json.loads(raw)
            replies = [
                {"op": "reply", "id": op["id"], "result": op["args"][0]}
                for op in (message if isinstance(message, list) else [message])
            ]
            await ws.send(json.dumps(replies if isinstance(message, list) else replies[0]))

    async with serve(node, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with AsyncClient(f"http://127.0.0.1:{port}", timeout=10) as client:
            results = await asyncio.gather(
                *(client.call("counter/alice-x", "echo", i) for i in range(calls))
            )
    assert results == list(range(calls))
    return frames


def test_concurrent_calls_go_out_in_batch_frames_within_the_node_s_limit() -> None:
    frames = asyncio.run(_calls_through_a_stand_in_node({"batch_bytes": 2048}, 300))
    batches = [json.loads(f) for f in frames if f.startswith("[")]
    assert batches and len(frames) < 300 // 5  # several calls a frame
    assert max(len(f) for f in frames) <= 2048
    assert sum(len(b) for b in batches) + len(frames) - len(batches) == 300


def test_a_node_that_does_not_offer_batches_gets_one_call_a_frame() -> None:
    frames = asyncio.run(_calls_through_a_stand_in_node({}, 50))
    assert len(frames) == 50 and not any(f.startswith("[") for f in frames)
