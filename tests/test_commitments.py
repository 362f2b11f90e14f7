"""Commitment-as-a-Service: triggers, delivery, retries, isolation, validation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import msgpack
import pytest
import redis

from conftest import Receiver, on_cluster_too, wait_until
from troth.caas import delivery
from troth.caas.actor import bus_name
from troth.core.access import Caller
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of
from troth.core.redis_clients import discovered_client
from troth.edge.server import ServerThread
from troth.node import Node

KEY_A, KEY_B = "key-alice-0123456789", "key-bob-0123456789ab"
FAST = {"max_attempts": 3, "initial_delay_seconds": 0.1, "backoff": "fixed"}


@pytest.fixture
def cs(make_node: Callable[..., Node]) -> Iterator[httpx.Client]:
    node = make_node("n1")
    server = ServerThread(node).start()
    with httpx.Client(base_url=server.url, timeout=15) as client:
        yield client
    server.stop()


def commit(
    cs: httpx.Client, receiver: Receiver, trigger: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    body = {
        "trigger": trigger,
        "obligation": {"target": receiver.url + "/hook", "payload": {"order": 17}},
        **extra,
    }
    resp = cs.post("/v1/commitments", json=body)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def status(cs: httpx.Client, cid: str) -> str:
    return str(cs.get(f"/v1/commitments/{cid}").json()["status"])


def event(cs: httpx.Client, event_type: str, **payload: Any) -> dict[str, Any]:
    resp = cs.post("/v1/events", json={"event_type": event_type, "payload": payload})
    assert resp.status_code == 202, resp.text
    return dict(resp.json())


def settled(cs: httpx.Client, cid: str, want: str = "fulfilled") -> dict[str, Any]:
    wait_until(lambda: status(cs, cid) == want, timeout=10)
    return dict(cs.get(f"/v1/commitments/{cid}").json())


def times_as_iso(doc: Any, where: str = "") -> int:
    """Checks the contract's rule for a commitment's JSON, and a delivery's body: every
    time, nested ones too, is ISO 8601 ``*_at`` (or ``at``), none Unix ms; senders'
    payloads and metadata are theirs. Returns how many times it saw."""
    seen = 0
    if isinstance(doc, list):
        return sum(times_as_iso(item, where) for item in doc)
    if not isinstance(doc, dict):
        return 0
    for key, value in doc.items():
        path = f"{where}.{key}"
        assert not key.endswith("_ms") or key == "duration_ms", f"{path} is in ms"
        if (key == "at" or key.endswith("_at")) and value is not None:
            assert datetime.fromisoformat(value).tzinfo is not None, path
            seen += 1
        elif key not in ("payload", "metadata"):
            seen += times_as_iso(value, path)
    return seen


def test_time_after_delivers_signed_body(cs: httpx.Client, receiver: Receiver) -> None:
    c = commit(cs, receiver, {"type": "time_after", "delay_seconds": 0.3})
    assert c["status"] == "pending" and c["due_at"]
    assert c["trigger"]["due_at"] == c["due_at"] and times_as_iso(c) == 5
    done = settled(cs, c["id"])
    [req] = receiver.requests
    secret = cs.get("/v1/commitments-secret").json()["secret"]
    assert delivery.verify(secret, req.headers, req.raw)
    assert req.headers["idempotency-key"] == c["id"] == req.headers["webhook-id"]
    body = req.body
    assert body["commitment_id"] == c["id"] and body["payload"] == {"order": 17}
    assert body["attempt"] == 1 and body["lateness_seconds"] >= 0
    assert body["due_at"] and body["fired_at"] and body["trigger"]["kind"] == "time"
    assert body["trigger"]["due_at"] == body["due_at"] == done["fired_by"]["due_at"]
    assert times_as_iso(body) == 3 and times_as_iso(done) == 13
    assert [a["status_code"] for a in done["attempts"]] == [200]
    assert [t["status"] for t in done["transitions"]] == ["pending", "triggered", "fulfilled"]


def test_a_finished_commitment_leaves_memory_at_once(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    """A fulfilled or cancelled commitment has nothing to do until it is read or
    retired: it passivates in its last commit instead of staying active for its 30 s
    idle time (memory at 100,000 due at once). Reading it loads it again."""
    node = make_node("n1")
    server = ServerThread(node).start()

    def active() -> set[str]:
        return {k for k in node.engine.cells if k.startswith("commitment/")}

    try:
        with httpx.Client(base_url=server.url, timeout=15) as cs:
            fired = commit(cs, receiver, {"type": "time_after", "delay_seconds": 0.2})
            # due within its 30 s idle time: kept (one due later leaves at its creation)
            waiting = commit(cs, receiver, {"type": "time_after", "delay_seconds": 20})
            dropped = commit(cs, receiver, {"type": "time_after", "delay_seconds": 600})
            assert cs.delete(f"/v1/commitments/{dropped['id']}").status_code == 200
            wait_until(lambda: len(receiver.requests) == 1)
            wait_until(lambda: active() == {f"commitment/local-{waiting['id']}"}, timeout=3)
            assert status(cs, fired["id"]) == "fulfilled"
            assert status(cs, dropped["id"]) == "cancelled"
    finally:
        server.stop()


def test_webhook_filters(cs: httpx.Client, receiver: Receiver) -> None:
    c = commit(
        cs,
        receiver,
        {
            "type": "webhook",
            "event_type": "payment.completed",
            "filters": {
                "amount_gte": 100,
                "currency_in": ["EUR", "USD"],
                "tags_contains": "vip",
                "customer.tier": "gold",
                "status_ne": "test",
            },
        },
    )
    base = {"amount": 150, "currency": "EUR", "tags": ["vip"], "customer": {"tier": "gold"}}
    for wrong in (
        {**base, "amount": 99},
        {**base, "currency": "GBP"},
        {**base, "tags": []},
        {**base, "customer": {"tier": "silver"}},
        {**base, "status": "test"},
    ):
        event(cs, "payment.completed", **wrong)
    event(cs, "payment.failed", **base)
    time.sleep(0.5)
    assert status(cs, c["id"]) == "pending" and receiver.count() == 0
    assert event(cs, "payment.completed", **base)["delivered_to"] == 1
    done = settled(cs, c["id"])
    assert done["fired_by"]["event"]["payload"]["amount"] == 150
    assert done["fired_by"]["event"]["received_at"] and times_as_iso(done["fired_by"]) == 2
    fired_by = receiver.requests[0].body["trigger"]
    assert fired_by["event"]["event_type"] == "payment.completed"
    assert fired_by == done["fired_by"] and times_as_iso(receiver.requests[0].body) == 4


def test_tool_complete(cs: httpx.Client, receiver: Receiver) -> None:
    c = commit(cs, receiver, {"type": "tool_complete", "tool_id": "t1", "outcome": "success"})
    event(cs, "tool_complete", tool_id="t1", outcome="error")
    event(cs, "tool_complete", tool_id="t2", outcome="success")
    time.sleep(0.4)
    assert status(cs, c["id"]) == "pending"
    event(cs, "tool_complete", tool_id="t1", outcome="success")
    settled(cs, c["id"])


def test_compound_any_and_all_with_progress(cs: httpx.Client, receiver: Receiver) -> None:
    any_ = commit(
        cs,
        receiver,
        {
            "type": "compound",
            "operator": "any",
            "triggers": [
                {"type": "webhook", "event_type": "a"},
                {"type": "time_after", "delay_seconds": 60},
            ],
        },
    )
    all_ = commit(
        cs,
        receiver,
        {
            "type": "compound",
            "operator": "all",
            "triggers": [
                {"type": "tool_complete", "tool_id": "x"},
                {"type": "tool_complete", "tool_id": "y"},
                {
                    "type": "compound",
                    "operator": "any",
                    "triggers": [
                        {"type": "webhook", "event_type": "b"},
                        {"type": "webhook", "event_type": "c"},
                    ],
                },
            ],
        },
    )
    event(cs, "a")
    settled(cs, any_["id"])
    event(cs, "tool_complete", tool_id="x")
    event(cs, "c")
    time.sleep(0.4)
    pending = cs.get(f"/v1/commitments/{all_['id']}").json()
    assert pending["status"] == "pending" and set(pending["progress"]) == {"r.0", "r.2.1"}
    assert pending["progress"]["r.2.1"]["event"]["event_type"] == "c"
    assert times_as_iso(pending["progress"]) == 6  # at, due_at, received_at: each leaf
    assert times_as_iso(any_["trigger"]) == 1  # the time_after's due_at
    event(cs, "tool_complete", tool_id="y")
    settled(cs, all_["id"])


def test_retries_then_fulfilled_with_same_key_and_valid_signatures(
    cs: httpx.Client, receiver: Receiver
) -> None:
    receiver.script = [500, 503]
    c = commit(
        cs,
        receiver,
        {"type": "time_after", "delay_seconds": 0},
        retry_policy={"max_attempts": 5, "backoff": "fixed", "initial_delay_seconds": 0.2},
    )
    done = settled(cs, c["id"])
    secret = cs.get("/v1/commitments-secret").json()["secret"]
    assert [r.headers["idempotency-key"] for r in receiver.requests] == [c["id"]] * 3
    assert all(delivery.verify(secret, r.headers, r.raw) for r in receiver.requests)
    assert [r.body["attempt"] for r in receiver.requests] == [1, 2, 3]
    assert [a["status_code"] for a in done["attempts"]] == [500, 503, 200]
    # the outcome's commit indexed it (a single Redis): listings show it at once
    [listed] = cs.get("/v1/commitments", params={"status": "fulfilled"}).json()["items"]
    assert listed["id"] == c["id"] and listed["attempts"] == 3
    assert cs.get("/v1/commitments", params={"status": "pending"}).json()["items"] == []


def test_client_error_fails_at_once_and_retry_redrives(
    cs: httpx.Client, receiver: Receiver
) -> None:
    receiver.script = [404]
    c = commit(cs, receiver, {"type": "time_after", "delay_seconds": 0}, retry_policy=FAST)
    failed = settled(cs, c["id"], "failed")
    assert len(failed["attempts"]) == 1 and "404" in failed["error"]
    dead = wait_until(lambda: cs.get("/v1/commitments?status=failed").json()["items"])
    assert [d["id"] for d in dead] == [c["id"]]
    assert cs.post(f"/v1/commitments/{c['id']}/retry").json()["status"] == "triggered"
    done = settled(cs, c["id"])
    assert [a["status_code"] for a in done["attempts"]] == [404, 200]
    assert cs.post(f"/v1/commitments/{c['id']}/retry").status_code == 409


def test_dedup_key_returns_existing(cs: httpx.Client, receiver: Receiver) -> None:
    c = commit(cs, receiver, {"type": "time_after", "delay_seconds": 60}, dedup_key="order-17")
    again = cs.post(
        "/v1/commitments",
        json={
            "trigger": {"type": "time_after", "delay_seconds": 60},
            "obligation": {"target": receiver.url},
            "dedup_key": "order-17",
        },
    )
    assert again.status_code == 200 and again.json()["id"] == c["id"]
    assert len(cs.get("/v1/commitments").json()["items"]) == 1


def test_batch_is_all_or_nothing(cs: httpx.Client, receiver: Receiver) -> None:
    good = {
        "trigger": {"type": "time_after", "delay_seconds": 60},
        "obligation": {"target": receiver.url},
    }
    bad = {"trigger": {"type": "time_after"}, "obligation": {"target": receiver.url}}
    resp = cs.post("/v1/commitments/batch", json={"commitments": [good, good, bad]})
    assert resp.status_code == 422 and "commitments.2" in resp.json()["error"]["message"]
    assert cs.get("/v1/commitments").json()["items"] == []
    created = cs.post("/v1/commitments/batch", json={"commitments": [good] * 5})
    assert created.status_code == 201
    ids = [c["id"] for c in created.json()["commitments"]]
    cancel = cs.post("/v1/commitments/batch/cancel", json={"ids": [*ids[:2], "cm_" + "0" * 32]})
    results = cancel.json()["results"]
    assert [r.get("status") for r in results[:2]] == ["cancelled", "cancelled"]
    assert results[2]["error"]["type"] == "NotFoundError"
    too_many = cs.post("/v1/commitments/batch", json={"commitments": [good] * 101})
    assert too_many.status_code == 422


def test_listing_filters_and_pages(cs: httpx.Client, receiver: Receiver) -> None:
    ids = [
        commit(cs, receiver, {"type": "time_after", "delay_seconds": 60})["id"] for _ in range(5)
    ]
    hook = commit(cs, receiver, {"type": "webhook", "event_type": "e"})["id"]
    cs.delete(f"/v1/commitments/{ids[0]}")
    seen: list[str] = []
    cursor = None
    while True:
        page = cs.get(
            "/v1/commitments", params={"limit": 2, **({"cursor": cursor} if cursor else {})}
        ).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted([*ids, hook]) and len(seen) == 6
    pend = cs.get("/v1/commitments", params={"status": "pending", "trigger_type": "time_after"})
    assert sorted(i["id"] for i in pend.json()["items"]) == sorted(ids[1:])
    assert cs.get("/v1/commitments?status=nope").status_code == 422
    # every row has every field, null where there is no value (the index stores none)
    rows = {i["id"]: i for i in cs.get("/v1/commitments").json()["items"]}
    waiting, cancelled = rows[hook], rows[ids[0]]
    assert set(waiting) == set(cancelled) and waiting["trigger_type"] == "webhook"
    assert [waiting[k] for k in ("due_at", "dedup_key", "retires_at")] == [None] * 3
    assert cancelled["status"] == "cancelled" and cancelled["retires_at"] > cancelled["updated_at"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"trigger": {"type": "sometimes"}, "obligation": {"target": "http://x"}}, "trigger"),
        (
            {
                "trigger": {"type": "webhook", "event_type": "e", "filters": {"amount_gte": "x"}},
                "obligation": {"target": "http://x"},
            },
            "filters",
        ),
        (
            {
                "trigger": {"type": "webhook", "event_type": "e", "filters": {"s_in": "x"}},
                "obligation": {"target": "http://x"},
            },
            "filters",
        ),
        (
            {
                "trigger": {"type": "time_after", "delay_seconds": 1},
                "obligation": {"target": "ftp://x"},
            },
            "obligation.target",
        ),
        ({"trigger": {"type": "time_after", "delay_seconds": 1}}, "obligation"),
        (
            {
                "trigger": {"type": "time_after", "delay_seconds": 1},
                "obligation": {"target": "http://x"},
                "colour": "red",
            },
            "colour",
        ),
        (
            {
                "trigger": {"type": "time_after", "timestamp": "2030-01-01T00:00:00"},
                "obligation": {"target": "http://x"},
            },
            "timezone",
        ),
    ],
)
def test_invalid_commitments_are_422_naming_the_field(
    cs: httpx.Client, body: dict[str, Any], field: str
) -> None:
    resp = cs.post("/v1/commitments", json=body)
    assert resp.status_code == 422, resp.text
    assert field in resp.json()["error"]["message"]


def test_malformed_and_oversized(cs: httpx.Client) -> None:
    json_type = {"content-type": "application/json"}
    assert cs.post("/v1/commitments", content=b"{nope", headers=json_type).status_code == 422
    assert cs.post("/v1/events", json={"payload": {}}).status_code == 422
    big = {"event_type": "e", "payload": {"x": "y" * 70_000}}
    assert cs.post("/v1/events", json=big).status_code == 422
    huge = b'{"event_type": "e", "payload": {"x": "' + b"y" * 2_000_000 + b'"}}'
    assert cs.post("/v1/events", content=huge, headers=json_type).status_code == 413
    assert cs.get("/v1/commitments/cm_nothing").status_code == 404


def test_loopback_target_refused_unless_allowed(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    node = make_node("n1", plugins={"commitments": {"allow_loopback": False}})
    server = ServerThread(node).start()
    try:
        with httpx.Client(base_url=server.url) as cs:
            c = commit(cs, receiver, {"type": "time_after", "delay_seconds": 0})
            failed = settled(cs, c["id"], "failed")
    finally:
        server.stop()
    assert "loopback" in failed["error"] and receiver.count() == 0


def test_tenant_isolation(make_node: Callable[..., Node], receiver: Receiver) -> None:
    node = make_node("n1", auth={"api_keys": {KEY_A: "alice", KEY_B: "bob"}})
    server = ServerThread(node).start()
    try:
        a = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {KEY_A}"})
        b = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {KEY_B}"})
        assert httpx.get(f"{server.url}/v1/commitments").status_code == 401
        c = commit(a, receiver, {"type": "webhook", "event_type": "go"})
        assert b.get(f"/v1/commitments/{c['id']}").status_code == 404
        assert b.delete(f"/v1/commitments/{c['id']}").status_code == 404
        assert b.get("/v1/commitments").json()["items"] == []
        assert event(b, "go")["delivered_to"] == 0  # bob's event: alice's stays pending
        time.sleep(0.3)
        assert status(a, c["id"]) == "pending"
        assert (
            a.get("/v1/commitments-secret").json()["secret"]
            != b.get("/v1/commitments-secret").json()["secret"]
        )
        event(a, "go")
        settled(a, c["id"])
        a.close()
        b.close()
    finally:
        server.stop()


def test_event_key_deduplicates(cs: httpx.Client, receiver: Receiver) -> None:
    commit(cs, receiver, {"type": "webhook", "event_type": "k"})
    body = {"event_type": "k", "event_key": "evt-1", "payload": {}}
    first = cs.post("/v1/events", json=body).json()
    second = cs.post("/v1/events", json=body).json()
    assert first["duplicate"] is False and first["delivered_to"] == 1
    assert second["duplicate"] is True and second["delivered_to"] == 0


def test_status_counts_commitments(
    cs: httpx.Client, receiver: Receiver, rclient: Any, prefix: str
) -> None:
    from troth.caas import CaaS
    from troth.core.keys import KeySpace
    from troth.edge import admin

    c = commit(cs, receiver, {"type": "time_after", "delay_seconds": 60})
    cs.delete(f"/v1/commitments/{c['id']}")
    commit(cs, receiver, {"type": "time_after", "delay_seconds": 60})
    counts = wait_until(
        lambda: (
            (d := admin.status(rclient, KeySpace(prefix, 64), [CaaS()])["commitments"]).get(
                "cancelled"
            )
            and d
        )
    )
    assert {k: counts[k] for k in ("cancelled", "pending", "retained")} == {
        "cancelled": 1,
        "pending": 1,
        "retained": 1,  # the cancelled one, until its retention ends
    }
    # Retired a day after it ended (the default retention).
    next_retirement = datetime.fromisoformat(counts["next_retirement_at"])
    assert 86_390 < (next_retirement - datetime.now(UTC)).total_seconds() <= 86_400


def test_metrics(cs: httpx.Client, receiver: Receiver) -> None:
    c = commit(cs, receiver, {"type": "time_after", "delay_seconds": 0})
    settled(cs, c["id"])
    text = wait_until(
        lambda: (
            (t := cs.get("/metrics").text)
            and 'troth_commitments{status="fulfilled"} 1.0' in t
            and t
        )
    )
    for name in (
        'troth_commitment_deliveries_total{outcome="ok"}',
        "troth_commitment_delivery_latency_seconds_bucket",
        "troth_commitment_firing_lateness_seconds_bucket",
    ):
        assert name in text, name


def test_openapi_lists_the_commitments_api(cs: httpx.Client) -> None:
    spec = cs.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [
        ("/v1/commitments", "post"),
        ("/v1/commitments", "get"),
        ("/v1/commitments/{cid}", "get"),
        ("/v1/commitments/{cid}", "delete"),
        ("/v1/commitments/{cid}/retry", "post"),
        ("/v1/commitments/batch", "post"),
        ("/v1/commitments/batch/cancel", "post"),
        ("/v1/events", "post"),
    ]:
        assert method in paths[path], (path, method)
    body = paths["/v1/commitments"]["post"]["requestBody"]["content"]["application/json"]
    name = body["schema"]["$ref"].rsplit("/", 1)[1]
    assert "trigger" in spec["components"]["schemas"][name]["properties"]


@on_cluster_too
def test_concurrent_creates_with_one_dedup_key_make_one_commitment(
    cs: httpx.Client, receiver: Receiver, redis_url: str, prefix: str
) -> None:
    """On a single Redis each request makes a commitment of its own, the commits bind
    the key, and all but the first are refused whole; on a Redis Cluster the API binds
    the key before it creates. Either way: one checkpoint, and every caller gets it."""
    from concurrent.futures import ThreadPoolExecutor

    body = {
        "trigger": {"type": "time_after", "delay_seconds": 3600},
        "obligation": {"target": receiver.url + "/hook"},
        "dedup_key": "order-17",
    }

    def create(_: int) -> httpx.Response:
        with httpx.Client(base_url=cs.base_url, timeout=15) as http:
            return http.post("/v1/commitments", json=body)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(create, range(8)))
    assert sorted(r.status_code for r in replies) == [200] * 7 + [201]
    assert len({r.json()["id"] for r in replies}) == 1
    # listed at once on a single Redis; on a cluster the index follows within seconds
    listed = wait_until(lambda: cs.get("/v1/commitments").json()["items"], timeout=10)
    assert [c["dedup_key"] for c in listed] == ["order-17"]
    rclient = discovered_client(redis_url)

    def checkpoints() -> list[str]:
        pattern = f"{prefix}:*:ca:commitment/*"
        return [k.decode() for k in rclient.scan_iter(match=pattern, count=1000)]

    found = checkpoints()
    assert len(found) == 1 and found[0].endswith(listed[0]["id"])
    again = cs.post("/v1/commitments", json=body)  # a repeat later: the same one
    assert again.status_code == 200 and again.json()["id"] == listed[0]["id"]
    assert len(checkpoints()) == 1


@pytest.mark.slow
def test_one_event_fires_a_thousand_subscribers_each_once(
    cs: httpx.Client, receiver: Receiver, rclient: redis.Redis, prefix: str
) -> None:
    spec = {
        "trigger": {"type": "webhook", "event_type": "go", "filters": {"n_gte": 1}},
        "obligation": {"target": receiver.url + "/hook"},
    }
    ids: list[str] = []
    for _ in range(10):
        resp = cs.post("/v1/commitments/batch", json={"commitments": [spec] * 100})
        assert resp.status_code == 201, resp.text
        ids += [c["id"] for c in resp.json()["commitments"]]
    assert len(set(ids)) == 1000
    # The subscribers are a set beside the bus's state, which stays small: a subscribe
    # writes one member, not the whole list.
    bus = bus_name("local", "go")
    shard_keys = KeySpace(prefix, 64).shard(shard_of(ActorName.parse(bus), 64))
    assert rclient.scard(shard_keys.members(bus)) == 1000
    assert len(rclient.hget(shard_keys.checkpoint(bus), "state") or b"") < 200
    assert event(cs, "go", n=1)["delivered_to"] == 1000
    wait_until(lambda: receiver.count() >= 1000, timeout=120)  # about 7 s here
    keys = [r.headers["idempotency-key"] for r in receiver.requests]
    assert sorted(keys) == sorted(ids)  # every one delivered, none twice
    # Fired commitments unsubscribe (one member each).
    wait_until(lambda: rclient.scard(shard_keys.members(bus)) == 0, timeout=30)


def test_a_bus_of_state_version_1_moves_its_subscribers_to_its_member_set(
    make_node: Callable[..., Node], rclient: redis.Redis, prefix: str
) -> None:
    """A bus written by an earlier troth (subscribers in its state) is upgraded when it
    is next activated."""
    bus = ActorName.parse(bus_name("local", "old"))
    keys = KeySpace(prefix, 64).shard(shard_of(bus, 64))
    old = [f"commitment/local-cm_{i:032x}" for i in range(3)]
    rclient.hset(
        keys.checkpoint(str(bus)),
        mapping={
            "state": msgpack.packb(
                {"subscribers": dict.fromkeys(old, 1), "recent_keys": [], "published": 0}
            ),
            "pstate": msgpack.packb({}),
            "version": "1.0.0",
            "seq": "3",
        },
    )
    node = make_node("n1")
    local = Caller("local", internal=True)
    new = "commitment/local-cm_" + "f" * 32
    assert node.call(bus, "subscribe", [new], caller=local).result(10) == 4
    assert rclient.smembers(keys.members(str(bus))) == {m.encode() for m in [*old, new]}
    state = msgpack.unpackb(rclient.hget(keys.checkpoint(str(bus)), "state"))
    assert "subscribers" not in state
    assert rclient.hget(keys.checkpoint(str(bus)), "version") == b"2.0.0"
