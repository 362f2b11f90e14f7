"""Tenancy: two principals, ``a`` and ``b``, each with only their own key, try to reach
each other's actors and commitments through every entry. Every attempt must fail
with a 4xx JSON error and change nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from websockets.sync.client import connect

from conftest import Receiver, wait_until
from troth.cluster.routing import CLUSTER_BATCH_PATH, CLUSTER_HEADER, CLUSTER_PATH, sign
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of
from troth.node import Node

KEY_A = "a" * 16
KEY_B = "b" * 16
AUTH = {"api_keys": {KEY_A: "a", KEY_B: "b"}}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(make_node: Callable[..., Node]) -> Node:
    return make_node("n1", serve=True, auth=AUTH)


@pytest.fixture
def http(keyed: Node) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keyed.url, timeout=15) as client:
        yield client


def create(http: httpx.Client, key: str, target: str, **extra: Any) -> httpx.Response:
    body = {
        "trigger": {"type": "webhook", "event_type": "paid"},
        "obligation": {"target": target, "payload": {"n": 1}},
        **extra,
    }
    return http.post("/v1/commitments", json=body, headers=bearer(key))


@pytest.mark.parametrize(
    ("actor", "method", "args"),
    [
        ("commitment/a-x", "create", [{"trigger": {}, "obligation": {}}]),
        ("commitment/a-x", "get", []),
        ("commitment/a-x", "on_delivery", [{"ok": True}]),
        ("commitment/a-x", "view", []),
        ("cmbus/a-x", "subscribe", ["commitment/b-y"]),
        ("cmbus/a-x", "publish", [{"event_type": "paid"}]),
    ],
)
def test_builtin_actors_expose_nothing_over_http(
    http: httpx.Client, rclient: redis.Redis, prefix: str, actor: str, method: str, args: list[Any]
) -> None:
    resp = http.post(f"/v1/actors/{actor}/{method}", json={"args": args}, headers=bearer(KEY_A))
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["type"] == "NotFoundError"
    assert not rclient.keys(f"{prefix}:*ca:{actor}*")  # not even activated


def test_builtin_actors_expose_nothing_over_websocket(keyed: Node) -> None:
    url = keyed.url.replace("http", "ws") + f"/v1/ws?token={KEY_A}"
    with connect(url) as ws:
        json.loads(ws.recv())  # hello
        ws.send(json.dumps({"op": "call", "id": "1", "actor": "cmbus/a-x", "method": "publish"}))
        reply = json.loads(ws.recv())
    assert reply["op"] == "error" and reply["error"]["type"] == "NotFoundError"


def test_commitments_belong_to_the_authenticated_principal(
    http: httpx.Client, rclient: redis.Redis, prefix: str, receiver: Receiver
) -> None:
    made = create(http, KEY_A, f"{receiver.url}/a")
    assert made.status_code == 201
    cid = made.json()["id"]
    assert http.get("/v1/commitments", headers=bearer(KEY_B)).json()["items"] == []
    assert http.get(f"/v1/commitments/{cid}", headers=bearer(KEY_B)).status_code == 404
    assert http.delete(f"/v1/commitments/{cid}", headers=bearer(KEY_B)).status_code == 404
    # b's event of the same type does not fire a's commitment
    http.post("/v1/events", json={"event_type": "paid"}, headers=bearer(KEY_B))
    time.sleep(0.5)
    assert receiver.count() == 0
    assert http.get(f"/v1/commitments/{cid}", headers=bearer(KEY_A)).json()["status"] == "pending"
    principals = {p.decode() for p in rclient.smembers(f"{prefix}:principals")}
    assert principals == {"a"}
    http.post("/v1/events", json={"event_type": "paid"}, headers=bearer(KEY_A))
    wait_until(lambda: receiver.count() == 1)
    # the delivery was signed with a's secret, not b's
    secret_a = http.get("/v1/commitments-secret", headers=bearer(KEY_A)).json()["secret"]
    secret_b = http.get("/v1/commitments-secret", headers=bearer(KEY_B)).json()["secret"]
    assert secret_a != secret_b
    from troth.caas.delivery import verify

    got = receiver.requests[0]
    assert verify(secret_a, got.headers, got.raw)
    assert not verify(secret_b, got.headers, got.raw)


def test_an_event_bus_takes_only_its_own_principals_commitments(keyed: Node) -> None:
    from troth.core.access import Caller

    bus = ActorName("cmbus", "a-x")
    with pytest.raises(Exception) as refused:
        keyed.call(
            bus, "subscribe", ["commitment/b-cm_1"], caller=Caller("a", internal=True)
        ).result(5)
    assert "not a commitment of 'a'" in str(refused.value)


def test_principals_cannot_call_each_others_actors(http: httpx.Client) -> None:
    resp = http.post("/v1/actors/counter/b-c/increment", headers=bearer(KEY_A))
    assert resp.status_code == 403 and resp.json()["error"]["type"] == "ForbiddenError"
    assert http.post("/v1/actors/counter/b-c/get", headers=bearer(KEY_B)).json() == {"result": 0}


def test_forged_cluster_calls_are_refused(
    http: httpx.Client, keyed: Node, rclient: redis.Redis, prefix: str
) -> None:
    body: dict[str, Any] = {
        "actor": "counter/b-victim",
        "method": "increment",
        "args": [1000],
        "kwargs": {},
        "request_id": "forged",
        "principal": "a",
        "sender": None,
        "internal": False,
        "sent_ms": int(time.time() * 1000),
        "timeout": 5,
    }
    raw = json.dumps(body).encode()
    secret = rclient.get(f"{prefix}:secret").decode()
    # the old trick: the raw secret in the header of the public endpoint counts for nothing
    resp = http.post(
        "/v1/actors/counter/b-victim/increment",
        json={"args": [1000]},
        headers={CLUSTER_HEADER: secret},
    )
    assert resp.status_code == 401
    # a wrong or missing signature
    for headers in ({}, {CLUSTER_HEADER: "0" * 64}, {CLUSTER_HEADER: secret}):
        resp = http.post(CLUSTER_PATH, content=raw, headers=headers)
        assert resp.status_code == 403, resp.text
    # a stale one cannot be replayed
    stale = json.dumps({**body, "sent_ms": body["sent_ms"] - 3_600_000}).encode()
    resp = http.post(CLUSTER_PATH, content=stale, headers={CLUSTER_HEADER: sign(secret, stale)})
    assert resp.status_code == 403
    # correctly signed, but for principal a: the owner re-checks ownership
    resp = http.post(CLUSTER_PATH, content=raw, headers={CLUSTER_HEADER: sign(secret, raw)})
    assert resp.status_code == 403 and resp.json()["error"]["type"] == "ForbiddenError"
    # the same in a batch: unsigned or with a stale call it is refused whole; signed,
    # each call is checked on its own
    batch = json.dumps({"calls": [body, {**body, "actor": "counter/a-own", "args": [1]}]})
    stale_batch = json.dumps({"calls": [{**body, "sent_ms": body["sent_ms"] - 3_600_000}]})
    for content, signature in (
        (batch, "0" * 64),
        (stale_batch, sign(secret, stale_batch.encode())),
    ):
        resp = http.post(CLUSTER_BATCH_PATH, content=content, headers={CLUSTER_HEADER: signature})
        assert resp.status_code == 403, resp.text
    signed = {CLUSTER_HEADER: sign(secret, batch.encode())}
    results = http.post(CLUSTER_BATCH_PATH, content=batch, headers=signed).json()["results"]
    assert results[0]["status"] == 403 and results[0]["error"]["type"] == "ForbiddenError"
    assert results[1] == {"result": 1}
    assert http.post("/v1/actors/counter/b-victim/get", headers=bearer(KEY_B)).json() == {
        "result": 0
    }


def test_websocket_method_cannot_walk_the_forwarding_path(
    make_node: Callable[..., Node], rclient: redis.Redis, prefix: str
) -> None:
    n1 = make_node("n1", serve=True, auth=AUTH)
    n2 = make_node("n2", serve=True, auth=AUTH)
    keys = KeySpace(prefix, 64)

    def owner(name: ActorName) -> str:
        return (rclient.hget(keys.shard(shard_of(name, 64)).lease, "owner") or b"").decode()

    wait_until(lambda: len(n1.leases.owned) == 32 and len(n2.leases.owned) == 32, timeout=20)
    probe = next(
        ActorName("counter", f"a-probe{i}")
        for i in range(1000)
        if owner(ActorName("counter", f"a-probe{i}")) == "n2"
    )
    url = n1.url.replace("http", "ws") + f"/v1/ws?token={KEY_A}"
    attacks = ["../b-victim/increment", "../../cmbus/b-x/publish", "increment/../../b-v", "a b"]
    with connect(url) as ws:
        json.loads(ws.recv())
        for i, method in enumerate(attacks):
            op = {"op": "call", "id": str(i), "actor": str(probe), "method": method}
            ws.send(json.dumps(op))
            reply = json.loads(ws.recv())
            assert reply["op"] == "error", reply
            assert reply["error"]["type"] == "BadRequestError", reply
        # a forwarded call for someone else's actor is refused at the entry and by the owner
        victim = next(
            ActorName("counter", f"b-victim{i}")
            for i in range(1000)
            if owner(ActorName("counter", f"b-victim{i}")) == "n2"
        )
        ws.send(json.dumps({"op": "call", "id": "x", "actor": str(victim), "method": "increment"}))
        assert json.loads(ws.recv())["error"]["type"] == "ForbiddenError"
    with httpx.Client(base_url=n2.url, headers=bearer(KEY_B)) as b:
        assert b.post(f"/v1/actors/{victim}/get").json() == {"result": 0}


def test_actor_messages_carry_the_senders_principal(
    make_node: Callable[..., Node], rclient: redis.Redis, prefix: str
) -> None:
    node = make_node("n1")
    crashy = ActorName("crashy", "a-x")
    assert node.call(crashy, "increment", [1], {"notify": "journal/b-j"}).result(5) == 1
    assert node.call(crashy, "increment", [1], {"notify": "journal/a-j"}).result(5) == 2
    own = ActorName("journal", "a-j")
    wait_until(lambda: node.call(own, "records").result(5) == [2])
    # b's journal never heard from a's actor: the message ended as a dead letter
    other = ActorName("journal", "b-j")
    keys = KeySpace(prefix, 64)
    assert not rclient.exists(keys.shard(shard_of(other, 64)).checkpoint(str(other)))

    def dead() -> list[Any]:
        from troth.edge import admin

        return [
            e
            for e in admin.inspect(rclient, keys, crashy)["outbox"]  # type: ignore[index]
            if e["status"] == "dead"
        ]

    wait_until(dead, timeout=10)
    assert "does not own journal/b-j" in (dead()[0]["result"] or {}).get("error", "")


def test_a_callee_sees_who_asked(http: httpx.Client, keyed: Node) -> None:
    resp = http.post("/v1/actors/probe/a-p/whoami", headers=bearer(KEY_A))
    assert resp.json() == {"result": {"principal": "a", "actor": None, "internal": False}}
    # internal methods: not for clients, but for the actor's own messages
    assert http.post("/v1/actors/probe/a-q/record", headers=bearer(KEY_A)).status_code == 404
    http.post("/v1/actors/probe/a-p/tell", json={"args": ["probe/a-q", 1]}, headers=bearer(KEY_A))
    wait_until(lambda: keyed.call(ActorName("probe", "a-q"), "get").result(5).get("callers"))
    callers = keyed.call(ActorName("probe", "a-q"), "get").result(5)["callers"]
    assert callers == [{"principal": "a", "actor": "probe/a-p", "internal": True}]
