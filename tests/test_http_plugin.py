"""The http plugin and the activity ledger: retries, final failures, uncertainty."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import redis

from conftest import Receiver, call, wait_until
from troth.core import codec
from troth.core.names import ActorName, shard_of
from troth.core.records import OutboxEntry
from troth.core.retry import RetryPolicy
from troth.edge.server import ServerThread
from troth.node import Node

FAST = {"max_attempts": 3, "initial_delay_seconds": 0.1, "backoff": "fixed"}


def results(api: httpx.Client) -> list[dict[str, Any]]:
    return list(call(api, "probe/alice-p", "get").json()["result"]["results"])


def test_retries_with_same_key_then_succeeds(api: httpx.Client, receiver: Receiver) -> None:
    receiver.script = [503, 500]
    entry = call(api, "probe/alice-p", "hook", receiver.url, {"x": 1}, retry=FAST).json()["result"]
    [res] = wait_until(lambda: results(api), timeout=10)
    assert res["ok"] and res["attempts"] == 3 and res["status_code"] == 200
    assert [h["status_code"] for h in res["history"]] == [503, 500, 200]
    assert {r.headers["idempotency-key"] for r in receiver.requests} == {entry}
    assert [r.body for r in receiver.requests] == [{"x": 1}] * 3


def test_client_error_fails_at_once(api: httpx.Client, receiver: Receiver) -> None:
    receiver.script = [400]
    call(api, "probe/alice-p", "hook", receiver.url, {}, retry=FAST)
    [res] = wait_until(lambda: results(api), timeout=10)
    assert not res["ok"] and res["attempts"] == 1 and res["status_code"] == 400


def test_dead_letter_shows_in_status(
    api: httpx.Client, node: Node, rclient: redis.Redis, receiver: Receiver
) -> None:
    from troth.edge import admin

    receiver.script = [500, 500]
    resp = call(api, "probe/alice-p", "nohook", receiver.url, {}, retry={**FAST, "max_attempts": 2})
    entry = resp.json()["result"]
    failures = wait_until(lambda: admin.status(rclient, node.keys)["recent_failures"], timeout=10)
    assert failures[0]["id"] == entry and failures[0]["status"] == "dead"
    assert failures[0]["attempts"] == 2 and "500" in failures[0]["error"]


def test_exhausted_retries_report_failure(api: httpx.Client, receiver: Receiver) -> None:
    receiver.script = [429, 429, 429]
    call(api, "probe/alice-p", "hook", receiver.url, {}, retry=FAST)
    [res] = wait_until(lambda: results(api), timeout=10)
    assert not res["ok"] and res["attempts"] == 3 and receiver.count() == 3


def test_loopback_refused_unless_allowed(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    node = make_node(
        "n1", plugins={"log": {}, "timers": {}, "send": {}, "http": {"allow_loopback": False}}
    )
    server = ServerThread(node).start()
    try:
        with httpx.Client(base_url=server.url) as api:
            call(api, "probe/alice-p", "hook", receiver.url, {})
            [res] = wait_until(lambda: results(api), timeout=10)
    finally:
        server.stop()
    assert not res["ok"] and "loopback" in res["error"] and receiver.count() == 0


def test_custom_idempotency_key_is_sent(api: httpx.Client, receiver: Receiver) -> None:
    call(api, "probe/alice-p", "hook", receiver.url, {}, key="order-17")
    wait_until(lambda: results(api))
    assert receiver.requests[0].headers["idempotency-key"] == "order-17"


def test_non_idempotent_attempt_hidden_by_crash_becomes_uncertain(
    make_node: Callable[..., Node], rclient: redis.Redis, receiver: Receiver
) -> None:
    """An entry found 'attempting' when a shard is claimed is not blindly repeated."""
    n1 = make_node("n1")
    name = ActorName.parse("probe/alice-p")
    n1.call(name, "get").result(5)
    n1.stop()
    sk = n1.keys.shard(shard_of(name, 64))
    for idem, eid in ((False, "probe/alice-p:9:http1"), (True, "probe/alice-p:9:http2")):
        entry = OutboxEntry(
            id=eid,
            kind="http",
            origin=str(name),
            spec={
                "method": "POST",
                "url": receiver.url,
                "json": {},
                "headers": {},
                "idempotent": idem,
                "tag": eid,
            },
            idempotency_key=eid,
            retry=RetryPolicy().model_dump(),
            on_result="on_result",
            status="attempting",
            attempts=1,
        )
        rclient.hset(sk.outbox, eid, codec.pack(entry.to_dict()))
        rclient.zadd(sk.outbox_queue, {eid: 0})
    n2 = make_node("n2")
    got = wait_until(
        lambda: (
            len(n2.call(name, "get").result(5)["results"]) == 2
            and n2.call(name, "get").result(5)["results"]
        ),
        timeout=10,
    )
    by_tag = {r["tag"]: r for r in got}
    assert by_tag["probe/alice-p:9:http1"]["uncertain"] is True
    assert by_tag["probe/alice-p:9:http2"]["ok"] is True
    assert [r.headers["idempotency-key"] for r in receiver.requests] == ["probe/alice-p:9:http2"]


def test_retry_policy_schedules() -> None:
    default = RetryPolicy()
    assert [default.delay_before(n) for n in range(1, 6)] == [0, 5, 25, 125, 625]
    linear = RetryPolicy(backoff="linear", initial_delay_seconds=2)
    assert [linear.delay_before(n) for n in range(1, 5)] == [0, 2, 4, 6]
    capped = RetryPolicy(initial_delay_seconds=10, max_delay_seconds=30)
    assert capped.delay_before(5) == 30
