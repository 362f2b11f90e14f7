"""What operators reach for: the /v1/admin API and the commands behind it (actors by
type, delete an actor, dead outbox entries re-driven or purged, drain a node), the
operator roles, per-route HTTP metrics and logs with context."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from conftest import Receiver, call, wait_until
from troth.core.names import ActorName, shard_of
from troth.edge.cli import main
from troth.edge.logs import ContextFilter, JsonFormatter
from troth.edge.server import ServerThread
from troth.node import Node

FAST = {"max_attempts": 2, "initial_delay_seconds": 0.05, "backoff": "fixed"}
OPS, VIEWER, ALICE = "key-ops-0123456789abc", "key-viewer-0123456789", "key-alice-0123456789"


@pytest.fixture
def served(make_node: Callable[..., Node]) -> Iterator[tuple[Node, httpx.Client]]:
    node = make_node("n1")
    server = ServerThread(node).start()
    with httpx.Client(base_url=server.url, timeout=15) as client:
        yield node, client
    server.stop()


def dead_entry(api: httpx.Client, receiver: Receiver, actor: str = "probe/alice-p") -> str:
    """An HTTP effect whose two attempts fail: a dead letter of ``actor``."""
    receiver.script = [500, 500]
    entry = str(call(api, actor, "nohook", receiver.url, {"n": 1}, retry=FAST).json()["result"])
    wait_until(lambda: any(e["id"] == entry for e in api.get("/v1/admin/outbox").json()["items"]))
    return entry


def actor_keys(rclient: redis.Redis, node: Node, name: str) -> list[bytes]:
    tag = node.keys.shard(shard_of(ActorName.parse(name), node.keys.shard_count)).tag
    return [k for k in rclient.scan_iter(f"{tag}:*", count=1000) if name.encode() in k]


def test_dead_entry_is_listed_redriven_once_with_its_key_and_purged(
    served: tuple[Node, httpx.Client], receiver: Receiver, rclient: redis.Redis
) -> None:
    node, api = served
    entry = dead_entry(api, receiver)
    [row] = [e for e in api.get("/v1/admin/outbox").json()["items"] if e["id"] == entry]
    assert row["status"] == "dead" and row["attempts"] == 2 and row["origin"] == "probe/alice-p"
    assert api.get("/v1/admin/outbox", params={"actor": "probe/alice-p"}).json()["items"]
    assert not api.get("/v1/admin/outbox", params={"actor": "probe/bob-p"}).json()["items"]

    # Re-drive: the owner takes it up within a heartbeat; the receiver answers 200 now.
    assert api.post("/v1/admin/outbox/redrive", json={"id": entry}).json()["status"] == "pending"
    wait_until(lambda: receiver.count() == 3)
    sk = node.keys.shard(shard_of(ActorName.parse("probe/alice-p"), node.keys.shard_count))
    wait_until(lambda: rclient.hget(sk.outbox, entry) is None)  # delivered: gone
    assert {r.headers["idempotency-key"] for r in receiver.requests} == {entry}
    assert api.post("/v1/admin/outbox/redrive", json={"id": entry}).status_code == 404

    # Purge: forgotten, never attempted again.
    other = dead_entry(api, receiver)
    assert api.post("/v1/admin/outbox/purge", json={"id": other}).json()["status"] == "purged"
    assert rclient.hget(sk.outbox, other) is None
    assert api.post("/v1/admin/outbox/purge", json={"id": other}).status_code == 404
    assert api.post("/v1/admin/outbox/redrive", json={"id": "nope"}).status_code == 404


def test_only_failed_entries_are_changed(
    served: tuple[Node, httpx.Client], receiver: Receiver
) -> None:
    _, api = served
    receiver.script = ["hang"]
    entry = call(api, "probe/alice-p", "nohook", receiver.url, {}, retry=FAST).json()["result"]
    wait_until(lambda: receiver.count() == 1)
    resp = api.post("/v1/admin/outbox/redrive", json={"id": entry})
    assert resp.status_code == 409 and "attempting" in resp.json()["error"]["message"]
    receiver.release.set()


def test_delete_actor_removes_every_key_and_the_name_starts_afresh(
    served: tuple[Node, httpx.Client], rclient: redis.Redis
) -> None:
    node, api = served
    call(api, "probe/alice-x", "set", 41)
    call(api, "probe/alice-x", "after", 60, "later")  # a timer
    assert actor_keys(rclient, node, "probe/alice-x")
    assert api.delete("/v1/admin/actors/probe/alice-x").json() == {"deleted": "probe/alice-x"}
    assert actor_keys(rclient, node, "probe/alice-x") == []
    sk = node.keys.shard(shard_of(ActorName.parse("probe/alice-x"), node.keys.shard_count))
    assert rclient.zcard(sk.timers) == 0
    assert api.get("/v1/admin/actors/probe/alice-x").status_code == 404
    assert api.delete("/v1/admin/actors/probe/alice-x").status_code == 404
    assert call(api, "probe/alice-x", "get").json()["result"]["value"] == 0  # init again


def test_actors_by_type_page_through_every_shard(served: tuple[Node, httpx.Client]) -> None:
    _, api = served
    probes = {f"probe/alice-{i}" for i in range(30)}
    for name in [*probes, "counter/a", "counter/b"]:
        call(api, name, "get" if name.startswith("probe") else "increment")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"type": "probe", "limit": 7}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/v1/admin/actors", params=params).json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(probes)  # each once, no other type
    everyone = api.get("/v1/admin/actors", params={"limit": 1000}).json()
    assert {"counter/a", "counter/b"} <= set(everyone["items"]) and everyone["next_cursor"] is None
    types = {t["name"]: t for t in api.get("/v1/admin/types").json()["types"]}
    assert "increment" in types["counter"]["methods"] and types["heartbeat"]["autonomous"]
    inspected = api.get("/v1/admin/actors/probe/alice-3").json()
    assert inspected["state"]["inits"] == 1 and inspected["seq"] >= 1


def test_operator_roles_and_metrics_behind_a_key(make_node: Callable[..., Node]) -> None:
    node = make_node(
        "n1",
        auth={
            "api_keys": {OPS: "ops", VIEWER: "viewer", ALICE: "alice"},
            "operators": {"ops": "write", "viewer": "read"},
        },
        metrics={"require_key": True},
    )
    server = ServerThread(node).start()
    try:
        with httpx.Client(base_url=server.url, timeout=15) as c:

            def get(path: str, key: str | None) -> int:
                headers = {"authorization": f"Bearer {key}"} if key else {}
                return c.get(path, headers=headers).status_code

            assert get("/v1/admin/status", None) == 401
            assert get("/v1/admin/status", ALICE) == 403  # a tenant is no operator
            assert get("/v1/admin/status", VIEWER) == 200
            assert get("/metrics", None) == 401 and get("/metrics", ALICE) == 403
            assert get("/metrics", VIEWER) == 200
            assert get("/ui/", None) == 200  # the page itself holds no data

            def redrive(key: str) -> httpx.Response:
                return c.post(
                    "/v1/admin/outbox/redrive",
                    headers={"authorization": f"Bearer {key}"},
                    json={"id": "probe/alice-p:1:http1"},
                )

            viewer = redrive(VIEWER)
            assert viewer.status_code == 403 and "only read" in viewer.json()["error"]["message"]
            ops = redrive(OPS)
            assert ops.status_code == 404  # allowed; there is no such entry
            me = c.get("/v1/admin/me", headers={"authorization": f"Bearer {OPS}"}).json()
            assert me["role"] == "write"
    finally:
        server.stop()


def test_operators_must_be_principals() -> None:
    from troth.core.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="no principal of api_keys"):
        parse_config({"auth": {"api_keys": {OPS: "ops"}, "operators": {"root": "write"}}})


def test_drain_hands_every_shard_to_the_others_and_undo_takes_them_back(
    make_node: Callable[..., Node],
) -> None:
    a = make_node("na", serve=True)
    b = make_node("nb", serve=True)
    wait_until(lambda: len(a.leases.owned) and len(b.leases.owned), timeout=10)
    with httpx.Client(base_url=a.url, timeout=15) as api:
        call(api, "counter/x", "increment")
        assert api.post("/v1/admin/nodes/na/drain", json={}).json()["draining"] is True
        wait_until(lambda: not a.leases.owned and len(b.leases.owned) == 64, timeout=15)
        ready = api.get("/ready")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        # Still serves calls (forwarded to the owner), and the last node cannot drain.
        assert call(api, "counter/x", "increment").json()["result"] == 2
        last = api.post("/v1/admin/nodes/nb/drain", json={})
        assert last.status_code == 409 and "last live node" in last.json()["error"]["message"]
        status = api.get("/v1/admin/status").json()
        assert {n["id"]: n["draining"] for n in status["nodes"]} == {"na": True, "nb": False}
        api.post("/v1/admin/nodes/na/drain", json={"undo": True})
        wait_until(lambda: len(a.leases.owned) == 32 == len(b.leases.owned), timeout=30)
        assert api.get("/ready").status_code == 200


def test_cli_actors_outbox_delete_and_drain(
    make_node: Callable[..., Node],
    receiver: Receiver,
    redis_url: str,
    prefix: str,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from conftest import base_config

    a = make_node("na", serve=True)
    b = make_node("nb", serve=True)
    config = tmp_path / "ca.json"
    config.write_text(json.dumps(base_config(prefix)))
    common = ["--config", str(config), "--redis", redis_url]

    errors: list[str] = []

    def troth(*args: str) -> tuple[int, str]:
        code = main([args[0], *common, *args[1:]])
        out = capsys.readouterr()
        errors.append(out.err)
        return code, out.out

    with httpx.Client(base_url=a.url, timeout=15) as api:
        call(api, "counter/c1", "increment")
        call(api, "probe/alice-q", "set", 1)
        entry = dead_entry(api, receiver, "probe/alice-q")
    assert troth("actors", "--type", "counter") == (0, "counter/c1\n")
    code, out = troth("outbox", "list")
    assert code == 0 and entry in out and "dead" in out
    assert troth("outbox", "redrive", entry) == (0, f"pending  {entry}\n")
    wait_until(lambda: receiver.count() == 3)
    assert troth("delete", "probe/alice-q") == (0, "deleted probe/alice-q\n")
    assert troth("actors", "--type", "probe") == (0, "")
    assert errors[-1] == "(no actors of type 'probe')\n"
    assert troth("actors", "--type", "countr") == (0, "")  # a typo: the hint names the types
    assert "(no actors of type 'countr'; the types this configuration names: " in errors[-1]
    assert "counter" in errors[-1]
    code, out = troth("drain", "nb", "--wait", "20")
    assert code == 0 and "nb is drained" in out
    assert not b.leases.owned and len(a.leases.owned) == 64
    assert troth("drain", "nb", "--undo")[0] == 0


def test_http_metrics_by_route_template(served: tuple[Node, httpx.Client]) -> None:
    _, api = served
    call(api, "counter/m1", "increment")
    call(api, "counter/m2", "increment")
    api.get("/no/such/path")
    text = api.get("/metrics").text
    route = "/v1/actors/{actor_type}/{actor_id}/{method}"
    assert f'troth_http_requests_total{{method="POST",route="{route}",status="200"}} 2.0' in text
    assert 'troth_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert f'troth_http_request_duration_seconds_count{{method="POST",route="{route}"}} 2.0' in text
    assert "counter/m1" not in text  # no raw paths in labels


def test_log_lines_carry_node_actor_and_request_id(
    served: tuple[Node, httpx.Client], caplog: pytest.LogCaptureFixture
) -> None:
    _, api = served
    caplog.handler.addFilter(ContextFilter())
    with caplog.at_level(logging.INFO):
        body = {"args": [], "kwargs": {}, "request_id": "req-42"}
        resp = api.post("/v1/actors/probe/alice-l/boom", json=body)  # an actor bug: logged
    assert resp.status_code == 500
    [record] = [r for r in caplog.records if "raised" in r.getMessage()]
    line = json.loads(JsonFormatter().format(record))
    assert line["node"] == "n1" and line["actor"] == "probe/alice-l"
    assert line["request_id"] == "req-42" and "trace_id" not in line  # tracing is off


def test_grafana_dashboard_reads_only_metrics_the_nodes_export(
    served: tuple[Node, httpx.Client],
) -> None:
    import re

    from conftest import REPO

    _, api = served
    text = api.get("/metrics").text
    dashboard = json.loads((REPO / "deploy" / "grafana" / "troth.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\btroth_[a-z_]+", e)}
    assert len(names) >= 15
    for name in names:
        base = name.removesuffix("_bucket")
        assert re.search(rf"^# HELP {base} ", text, re.M), f"{name} is not exported"


def test_access_log_and_tenant_labels_when_asked(
    make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node("n1", node={"access_log": True, "port": 0}, metrics={"principal_labels": True})
    server = ServerThread(node).start()
    try:
        with httpx.Client(base_url=server.url, timeout=15) as api, caplog.at_level(logging.INFO):
            body = {
                "trigger": {"type": "time_after", "delay_seconds": 60},
                "obligation": {"target": "http://127.0.0.1:9/x"},
            }
            assert api.post("/v1/commitments", json=body).status_code == 201
            api.get("/health", headers={"x-request-id": "abc-1"})
            text = wait_until(
                lambda: (
                    (t := api.get("/metrics").text)
                    and 'troth_commitments{principal="local",status="pending"} 1.0' in t
                )
            )
            assert text
    finally:
        server.stop()
    [line] = [r for r in caplog.records if r.name == "troth.access" and "/health" in r.getMessage()]
    assert "GET /health 200" in line.getMessage() and line.__dict__["request_id"] == "abc-1"
