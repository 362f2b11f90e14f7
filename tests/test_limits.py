"""What comes from outside is bounded, and a node without API keys stays local."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from conftest import call, wait_until
from troth.client import AsyncClient
from troth.core.names import shard_of
from troth.node import Node

KEY = "k" * 16


def ws_url(node: Node, token: str | None = None) -> str:
    return node.url.replace("http", "ws") + "/v1/ws" + (f"?token={token}" if token else "")


# -- no API keys: loopback clients only ---------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"host": "evil.example"}, 403),  # DNS rebinding: the browser sends the attacker's name
        ({"host": "127.0.0.1.evil.example:8700"}, 403),
        ({"origin": "http://evil.example"}, 403),  # a cross-site request
        ({"origin": "null"}, 403),
        ({"content-type": "text/plain"}, 415),  # a form or no-cors fetch
        ({"content-type": "application/x-www-form-urlencoded"}, 415),
    ],
)
def test_without_keys_only_local_json_requests_are_served(
    api: httpx.Client, headers: dict[str, str], status: int
) -> None:
    resp = api.post(
        "/v1/commitments",
        content=json.dumps(
            {
                "trigger": {"type": "time_after", "delay_seconds": 60},
                "obligation": {"target": "http://127.0.0.1:9/"},
            }
        ),
        headers={"content-type": "application/json", **headers},
    )
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["message"]
    assert api.get("/v1/commitments").json()["items"] == []
    call = api.post(
        "/v1/actors/counter/x/increment",
        content=b"{}",
        headers={"content-type": "application/json", **headers},
    )
    assert call.status_code == status, call.text
    assert api.post("/v1/actors/counter/x/get", json={}).json() == {"result": 0}
    assert api.get("/v1/commitments-secret", headers=headers).status_code in (200, 403)
    if "host" in headers or "origin" in headers:
        assert api.get("/v1/commitments-secret", headers=headers).status_code == 403


def test_without_keys_local_names_and_json_work(api: httpx.Client) -> None:
    for host in ("localhost:1", "127.0.0.1", "[::1]:8700", "127.0.0.2:80"):
        resp = api.post(
            "/v1/actors/counter/x/increment",
            json={},
            headers={"host": host, "origin": "http://localhost:3000"},
        )
        assert resp.status_code == 200, (host, resp.text)


def test_without_keys_a_cross_site_websocket_is_refused(make_node: Callable[..., Node]) -> None:
    node = make_node("n1", serve=True)
    with (
        pytest.raises(InvalidStatus) as refused,
        connect(ws_url(node), origin=Origin("http://evil.example")) as ws,
    ):
        ws.recv()
    assert refused.value.response.status_code == 403
    with connect(ws_url(node), origin=Origin("http://localhost:3000")) as ws:
        assert json.loads(ws.recv())["op"] == "hello"


# -- WebSocket bounds -----------------------------------------------------------------------


@pytest.fixture
def served(make_node: Callable[..., Node]) -> Node:
    return make_node("n1", serve=True, node={"max_body_bytes": 4096})


def test_websocket_frames_are_bounded_and_checked(served: Node) -> None:
    with connect(ws_url(served)) as ws:
        # offered, declined: no zlib context per session, no CPU spent on small frames
        assert ws.response is not None
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        json.loads(ws.recv())
        ws.send("{not json")
        err = json.loads(ws.recv())
        assert err["op"] == "error" and err["error"]["type"] == "BadRequestError"
        ws.send('{"op": "call", "id": "n", "actor": "counter/x", "method": "add", "args": [NaN]}')
        assert json.loads(ws.recv())["error"]["type"] == "BadRequestError"
        ws.send(json.dumps({"op": "subscribe", "actor": "counter/x", "since": f"{2**64}-0"}))
        assert json.loads(ws.recv())["error"]["type"] == "ValidationError"
        # the session is still usable after each refusal
        ws.send(json.dumps({"op": "call", "id": "ok", "actor": "counter/x", "method": "get"}))
        assert json.loads(ws.recv()) == {"op": "reply", "id": "ok", "result": 0}
        ws.send(b"\x00binary")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
    with connect(ws_url(served)) as ws:
        json.loads(ws.recv())
        ws.send(
            json.dumps(
                {
                    "op": "call",
                    "id": "big",
                    "actor": "counter/x",
                    "method": "get",
                    "args": ["x" * 5000],
                }
            )
        )
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_a_batch_frame_is_answered_op_by_op_and_bounded(make_node: Callable[..., Node]) -> None:
    """A frame may carry a JSON array of ops (a batch): each is validated and answered
    on its own, as if sent alone; a session that sent a batch receives its replies in
    batches; a batch over 1,000 ops is refused whole."""
    node = make_node("n1", serve=True, node={"max_body_bytes": 200_000})
    with connect(ws_url(node)) as ws:
        hello = json.loads(ws.recv())
        assert hello["batch_bytes"] == 200_000  # node.max_body_bytes
        call = {"op": "call", "actor": "counter/alice-b", "method": "increment"}
        ws.send(json.dumps({**call, "id": "alone"}))
        assert json.loads(ws.recv()) == {"op": "reply", "id": "alone", "result": 1}
        batch = [
            {**call, "id": "a", "args": [10]},
            {"op": "call", "id": "bad", "actor": "counter/alice-b"},  # no method
            {**call, "id": "b", "args": [100]},
            {**call, "id": "c", "method": "_private"},
            {"op": "subscribe", "actor": "counter/alice-b", "since": "0-0"},
        ]
        ws.send(json.dumps(batch))
        replies: dict[str, dict[str, Any]] = {}
        arrays = 0
        while len(replies) < 4:
            frame = json.loads(ws.recv())
            arrays += isinstance(frame, list)
            for message in frame if isinstance(frame, list) else [frame]:
                if message["op"] != "notify":
                    replies[message["id"]] = message
        assert arrays >= 1
        # started in order, as if each came in a frame of its own
        assert (replies["a"]["result"], replies["b"]["result"]) == (11, 111)
        assert replies["bad"]["error"]["type"] == "ValidationError"
        assert replies["c"]["error"]["type"] == "NotFoundError"
        ws.send(json.dumps([{**call, "id": f"x{i}"} for i in range(1001)]))
        refused: list[dict[str, Any]] = []
        while not refused:  # (past notifications of the subscription)
            frame = json.loads(ws.recv())
            refused = [
                m for m in (frame if isinstance(frame, list) else [frame]) if m["op"] == "error"
            ]
        assert refused[0]["id"] is None and "at most 1000" in refused[0]["error"]["message"]
        ws.send(json.dumps([{**call, "id": "after", "method": "get"}]))
        while True:  # nothing of the refused batch ran
            frame = json.loads(ws.recv())
            found = [m for m in (frame if isinstance(frame, list) else [frame]) if m.get("id")]
            if found:
                assert found == [{"op": "reply", "id": "after", "result": 111}]
                break


def test_the_client_batches_its_calls_within_the_frames_a_node_takes(served: Node) -> None:
    """200 calls at once through one client session go out in batches that each fit
    in the node's 4 KiB frames (about 25 calls; a larger frame would have the node
    close the session with 1009, and the calls would never finish), and every call is
    answered once."""

    async def run() -> list[Any]:
        async with AsyncClient(served.url, timeout=20) as client:
            names = [f"counter/alice-p{i}" for i in range(200)]
            return await asyncio.gather(
                *(client.call(n, "increment", i + 1) for i, n in enumerate(names))
            )

    assert asyncio.run(run()) == list(range(1, 201))


def test_subscriptions_are_bounded_per_node(make_node: Callable[..., Node]) -> None:
    node = make_node("n1", serve=True, runtime={"max_subscriptions": 3})
    with connect(ws_url(node)) as one, connect(ws_url(node)) as two:
        for ws in (one, two):
            json.loads(ws.recv())
        for i in range(3):
            one.send(json.dumps({"op": "subscribe", "actor": f"counter/s{i}"}))
        full = "troth_subscriptions 3.0"  # the other session's are taken first
        wait_until(lambda: full in httpx.get(f"{node.url}/metrics").text, timeout=10)
        two.send(json.dumps({"op": "subscribe", "actor": "counter/s9"}))
        err = json.loads(two.recv())
        assert err["op"] == "error" and "3 subscriptions" in err["error"]["message"]
        # and a subscription still works
        httpx.post(f"{node.url}/v1/actors/counter/s0/increment", json={})


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a content-length, however it was segmented."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def test_a_slow_request_head_is_cut_off(make_node: Callable[..., Node]) -> None:
    node = make_node("n1", serve=True, node={"header_timeout_seconds": 0.5})
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        sock.settimeout(5)
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the node
        assert time.monotonic() - started < 3
    with socket.create_connection((host, int(port))) as sock:  # kept alive, then slow
        sock.settimeout(5)
        for _ in range(2):  # each response moves the deadline on
            time.sleep(0.3)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # never finished
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert time.monotonic() - started < 3
    assert httpx.get(f"{node.url}/health").status_code == 200


# -- quotas ------------------------------------------------------------------------------


def test_actor_quota_answers_429_and_creates_nothing(make_node: Callable[..., Node]) -> None:
    node = make_node("n1", serve=True, auth={"api_keys": {KEY: "a"}}, quotas={"actors": 2})
    with httpx.Client(base_url=node.url, headers={"authorization": f"Bearer {KEY}"}) as api:
        for i in range(2):
            assert call(api, f"counter/a-{i}", "increment").status_code == 200
        assert call(api, "counter/a-0", "increment").json() == {"result": 2}  # existing: fine
        resp = call(api, "counter/a-new", "get")
        assert resp.status_code == 429 and resp.headers["retry-after"]
        assert resp.json()["error"]["type"] == "QuotaExceeded"
    assert node.quotas.actors_created("a") == 2


def test_a_quota_refusal_keeps_its_retry_after_across_nodes(
    make_node: Callable[..., Node],
) -> None:
    """The owner of a new actor refuses it (actor quota: retry in 60 s); a caller that
    entered at another node gets the owner's wait, in the header and in the error's
    data (which WebSocket clients read), not a default of 1 s."""
    settings = {"auth": {"api_keys": {KEY: "a"}}, "quotas": {"actors": 1}}
    a, b = make_node("a", serve=True, **settings), make_node("b", serve=True, **settings)
    wait_until(lambda: len(a.leases.owned) == len(b.leases.owned) == 32, timeout=10)
    wait_until(lambda: len(a.leases.urls) == 2, timeout=5)
    on_b = [f"a-{i}" for i in range(1000) if b.leases.epoch_of(shard_of(f"counter/a-{i}", 64))][:2]
    with httpx.Client(base_url=a.url, headers={"authorization": f"Bearer {KEY}"}) as api:
        assert call(api, f"counter/{on_b[0]}", "increment").status_code == 200
        over = call(api, f"counter/{on_b[1]}", "increment")
    assert over.status_code == 429 and over.headers["retry-after"] == "60"
    assert over.json()["error"]["data"] == {"retry_after": 60}
    assert f"counter/{on_b[1]}" not in a.engine.cells


def test_event_rate_and_pending_quotas(make_node: Callable[..., Node]) -> None:
    node = make_node(
        "n1",
        serve=True,
        quotas={"events_per_second": 3, "per_principal": {"local": {"pending_commitments": 1}}},
    )
    with httpx.Client(base_url=node.url) as api:
        body = {
            "trigger": {"type": "time_after", "delay_seconds": 600},
            "obligation": {"target": "http://127.0.0.1:9/"},
        }
        assert api.post("/v1/commitments", json=body).status_code == 201
        over = api.post("/v1/commitments", json=body)
        assert over.status_code == 429 and "quota" in over.json()["error"]["message"]
        batch = api.post("/v1/commitments/batch", json={"commitments": [body, body]})
        assert batch.status_code == 429  # refused whole, before any is created
        assert len(api.get("/v1/commitments").json()["items"]) == 1
        statuses = [api.post("/v1/events", json={"event_type": "e"}).status_code for _ in range(8)]
        assert 429 in statuses and statuses[0] == 202


def test_many_subscriptions_share_one_redis_connection(
    make_node: Callable[..., Node], rclient: redis.Redis
) -> None:
    """20 sessions x 100 subscriptions once exhausted the node's Redis pool; they are
    now served by one reader, and notifications still flow."""
    node = make_node("n1", serve=True)
    before = int(rclient.info("clients")["connected_clients"])
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(connect(ws_url(node))) for _ in range(20)]
        for ws in sessions:
            json.loads(ws.recv())
            for i in range(100):
                ws.send(json.dumps({"op": "subscribe", "actor": f"probe/alice-n{i}"}))
        gauge = "troth_subscriptions 2000.0"
        wait_until(lambda: gauge in httpx.get(f"{node.url}/metrics").text, timeout=20)
        time.sleep(1)
        grown = int(rclient.info("clients")["connected_clients"]) - before
        assert grown <= 4, grown
        assert httpx.get(f"{node.url}/health", timeout=2).status_code == 200
