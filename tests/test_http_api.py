"""The node's HTTP API contract (design section 7)."""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Callable

import httpx
import pytest

from conftest import call
from troth.core.config import ConfigError, parse_config
from troth.edge.server import ServerThread, bind
from troth.node import Node


def test_ready_needs_redis_and_shards(make_node: Callable[..., Node]) -> None:
    """/ready (readiness) is 200 only on a node that owns shards; /health (liveness)
    is 200 on both, so a load balancer skips the second without restarting it."""
    first = make_node("a", serve=True, cluster={"shards": 1})
    second = make_node("b", serve=True, cluster={"shards": 1})  # the one shard is taken
    with httpx.Client(timeout=10) as http:
        ok = http.get(f"{first.url}/ready")
        assert ok.status_code == 200 and ok.json()["status"] == "ready"
        assert ok.json()["shards"] == 1
        idle = http.get(f"{second.url}/ready")
        assert idle.status_code == 503 and "owns no shards" in idle.json()["error"]
        assert idle.headers["retry-after"] == "1"
        assert http.get(f"{second.url}/health").status_code == 200


def test_responses_do_not_name_the_server(api: httpx.Client) -> None:
    for resp in (api.get("/health"), api.post("/v1/actors/counter/alice-s/get", json={})):
        assert resp.status_code == 200
        assert "server" not in resp.headers and "date" in resp.headers


def _data_segments_in(sock: socket.socket) -> int:
    """TCP segments with data this socket has received (Linux 4.6's
    ``tcp_info.tcpi_data_segs_in``: lone ACKs are not counted)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return int(struct.unpack_from("I", info, 152)[0])


def _responses(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` whole responses (each with a Content-Length) read from ``sock``."""
    data, out = b"", list[bytes]()
    while len(out) < count:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(rest) >= length:
                out.append(head + sep + rest[:length])
                data = rest[length:]
                continue
        data += sock.recv(65536)
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's tcp_info")
def test_a_small_response_leaves_in_one_segment_and_pipelined_ones_in_order(
    make_node: Callable[..., Node],
) -> None:
    """A response's head and body go out in one write: the client takes one TCP
    segment a response, not two (each costs both ends a wake-up). Pipelined requests
    are still answered in order."""
    node = make_node("n1", serve=True)
    host, port = node.url.removeprefix("http://").split(":")
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(10)
        before, count = _data_segments_in(sock), 50
        for _ in range(count):
            sock.sendall(request)
            (response,) = _responses(sock, 1)
            assert response.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in response
        assert _data_segments_in(sock) - before == count  # one a response, not two
        paths = [b"/health", b"/nowhere", b"/ready"]
        sock.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % p for p in paths))
        statuses = [r.split(b" ", 2)[1] for r in _responses(sock, 3)]
        assert statuses == [b"200", b"404", b"200"]


def test_health_and_metrics(api: httpx.Client) -> None:
    h = api.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["shards"] == 64
    call(api, "counter/alice-c", "increment", 1)
    m = api.get("/metrics").text
    for metric in (
        "troth_commits_total",
        "troth_rollbacks_total",
        "troth_messages_total",
        "troth_commit_latency_seconds_bucket",
        "troth_active_actors",
        "troth_outbox_backlog",
        "troth_timer_backlog",
    ):
        assert metric in m, metric
    if sys.platform == "linux":  # the event loop's thread as the kernel scheduled it
        seconds = {
            line.split()[0]: float(line.split()[1])
            for line in m.splitlines()
            if line.startswith("troth_loop_cpu")
        }
        assert seconds["troth_loop_cpu_seconds_total"] > 0
        assert seconds["troth_loop_cpu_wait_seconds_total"] >= 0


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("/v1/actors/nosuch/alice-1/get", {}, 404, "NotFoundError"),
        ("/v1/actors/counter/alice-1/nosuch", {}, 404, "NotFoundError"),
        ("/v1/actors/counter/alice-1/_private", {}, 404, "NotFoundError"),
        ("/v1/actors/counter/alice-1/increment", {"args": [0]}, 409, "AppError"),
        ("/v1/actors/counter/alice-1/increment", {"args": [1, 2, 3]}, 422, "BadRequestError"),
        ("/v1/actors/counter/alice-1/increment", {"kwargs": {"nope": 1}}, 422, "BadRequestError"),
        ("/v1/actors/counter/alice-1/increment", {"args": "x"}, 422, "ValidationError"),
        ("/v1/actors/counter/alice-1/increment", {"extra": 1}, 422, "ValidationError"),
        ("/v1/actors/counter/alice-1/increment", {"request_id": ""}, 422, "ValidationError"),
        ("/v1/actors/Counter!/alice-1/increment", {}, 422, "BadRequestError"),
    ],
)
def test_errors_name_the_problem(
    api: httpx.Client, path: str, body: object, status: int, kind: str
) -> None:
    resp = api.post(path, json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == kind and err["message"]


def test_malformed_json_and_oversized_body(api: httpx.Client) -> None:
    json_type = {"content-type": "application/json"}
    resp = api.post(
        "/v1/actors/counter/alice-1/increment", content=b'{"args": [', headers=json_type
    )
    assert resp.status_code == 422 and "JSON" in resp.json()["error"]["message"]
    big = b'{"args": ["' + b"x" * 2_000_000 + b'"]}'
    resp = api.post("/v1/actors/counter/alice-1/increment", content=big, headers=json_type)
    assert resp.status_code == 413


def test_empty_body_means_no_arguments(api: httpx.Client) -> None:
    assert api.post("/v1/actors/counter/alice-1/increment").json() == {"result": 1}


def test_openapi_schema_served(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    assert "/v1/actors/{actor_type}/{actor_id}/{method}" in spec["paths"]


def test_api_keys_map_to_principals(make_node: Callable[..., Node]) -> None:
    node = make_node(
        "n1", auth={"api_keys": {"key-alice-0123456789": "alice", "key-bob-0123456789ab": "bob"}}
    )
    server = ServerThread(node).start()
    try:
        with httpx.Client(base_url=server.url) as api:
            url = "/v1/actors/counter/alice-c/increment"
            assert api.post(url).status_code == 401
            assert api.post(url, headers={"authorization": "Bearer wrong"}).status_code == 401
            assert (
                api.post(url, headers={"authorization": "Bearer key-bob-0123456789ab"}).status_code
                == 403
            )
            ok = api.post(url, headers={"authorization": "Bearer key-alice-0123456789"})
            assert ok.json() == {"result": 1}
    finally:
        server.stop()


def test_refuses_public_bind_without_keys() -> None:
    with pytest.raises(ConfigError, match="api_keys"):
        bind("0.0.0.0", 0, parse_config({}))


def test_a_call_past_its_timeout_answers_504_and_runs_on(make_node: Callable[..., Node]) -> None:
    """The caller stops waiting at ``node.call_timeout_seconds``; the call itself is
    not undone: it commits, and the actor's next message sees it."""
    node = make_node("a", serve=True, node={"call_timeout_seconds": 0.5})
    with httpx.Client(base_url=node.url, timeout=10) as http:
        started = time.monotonic()
        late = http.post("/v1/actors/probe/alice-late/nap", json={"args": [1.5, "slow"]})
        waited = time.monotonic() - started
        assert late.status_code == 504, late.text
        assert late.json()["error"]["type"] == "CallTimeout"
        assert 0.4 <= waited < 1.4
        time.sleep(1.2)  # the nap ends, and commits
        after = http.post("/v1/actors/probe/alice-late/nap", json={"args": [0, "next"]})
        assert after.status_code == 200 and after.json()["result"] == ["slow", "next"]
