"""One message = one transaction: rollback is total, commits carry their effects."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx
import pytest
import redis

from conftest import Receiver, call, wait_until
from troth.core.access import Caller
from troth.core.names import ActorName
from troth.edge import admin
from troth.node import Node


def snapshot(node: Node, rclient: redis.Redis, name: str) -> dict[str, Any]:
    """Everything durable about an actor and its shard's side-effect queues."""
    data = admin.inspect(rclient, node.keys, _name(name))
    assert data is not None
    status = admin.status(rclient, node.keys)
    return {
        "state": data["state"],
        "seq": data["seq"],
        "timers": data["timers"],
        "outbox": data["outbox"],
        "shard_timers": status["timers"],
        "shard_outbox": status["outbox"],
    }


def _name(text: str) -> Any:
    from troth.core.names import ActorName

    return ActorName.parse(text)


@pytest.mark.parametrize(
    ("fail", "status", "kind"),
    [("app", 409, "AppError"), ("bug", 500, "ActorError"), ("state", 500, "SerializationError")],
)
def test_failure_leaves_state_and_side_effects_untouched(
    api: httpx.Client, node: Node, rclient: redis.Redis, fail: str, status: int, kind: str
) -> None:
    assert call(api, "crashy/alice-x", "increment", 1, notify="journal/alice-j").json() == {
        "result": 1
    }
    wait_until(lambda: call(api, "journal/alice-j", "records").json()["result"] == [1])
    before = snapshot(node, rclient, "crashy/alice-x")

    resp = call(api, "crashy/alice-x", "increment", 5, fail=fail, notify="journal/alice-j")
    assert resp.status_code == status
    assert resp.json()["error"]["type"] == kind

    time.sleep(0.3)  # give a (wrongly) committed side effect time to show up
    assert snapshot(node, rclient, "crashy/alice-x") == before
    assert call(api, "journal/alice-j", "records").json()["result"] == [1]
    # The in-memory state rolled back too, and the actor still serves.
    assert call(api, "crashy/alice-x", "get").json()["result"] == {"count": 1, "seen": [1]}
    assert call(api, "crashy/alice-x", "increment", 2).json()["result"] == 3


def test_committed_message_commits_its_side_effects(
    api: httpx.Client, node: Node, rclient: redis.Redis
) -> None:
    call(api, "crashy/alice-x", "increment", 4, notify="journal/alice-j")
    data = admin.inspect(rclient, node.keys, _name("crashy/alice-x"))
    assert data is not None and data["state"]["count"] == 4
    assert list(data["timers"]) == ["t4"]
    wait_until(lambda: call(api, "journal/alice-j", "records").json()["result"] == [4])


def test_concurrent_callers_are_serialized(api: httpx.Client) -> None:
    """The caf.js crashy-counter assertion: 50 concurrent increments, no lost update."""
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        replies = list(
            pool.map(
                lambda _: call(api, "crashy/bob-c", "increment", 1).json()["result"], range(50)
            )
        )
    assert sorted(replies) == list(range(1, 51))
    assert call(api, "crashy/bob-c", "get").json()["result"]["count"] == 50


def test_request_id_replays_committed_reply(api: httpx.Client, node: Node) -> None:
    first = call(api, "counter/alice-c", "increment", 5, request_id="req-1")
    again = call(api, "counter/alice-c", "increment", 5, request_id="req-1")
    assert first.json() == again.json() == {"result": 5}
    assert call(api, "counter/alice-c", "get").json()["result"] == 5
    assert node.metrics.registry.get_sample_value("troth_request_dedup_hits_total") == 1


def test_none_reply_is_deduplicated_too(api: httpx.Client) -> None:
    for _ in range(3):
        assert call(api, "probe/alice-p", "bump", request_id="b1").json() == {"result": None}
    assert call(api, "probe/alice-p", "get").json()["result"]["value"] == 1


def test_failed_request_is_not_cached(api: httpx.Client) -> None:
    assert call(api, "counter/alice-c", "increment", 0, request_id="r").status_code == 409
    assert call(api, "counter/alice-c", "increment", 2, request_id="r").json()["result"] == 2


def test_send_is_processed_once_even_if_delivered_twice(api: httpx.Client, node: Node) -> None:
    msg_id = call(api, "probe/alice-p", "tell", "journal/alice-j", "x").json()["result"]
    wait_until(lambda: call(api, "probe/alice-p", "get").json()["result"]["results"])
    # Redeliver the very same message (as the outbox would after a crash).
    journal = ActorName.parse("journal/alice-j")
    node.call(journal, "record", ["x"], {}, msg_id, Caller.of_actor("probe/alice-p")).result(5)
    assert call(api, "journal/alice-j", "records").json()["result"] == ["x"]
    result = call(api, "probe/alice-p", "get").json()["result"]["results"][0]
    assert result["ok"] is True and result["value"] == 1


def test_webhook_only_after_commit(api: httpx.Client, receiver: Receiver) -> None:
    resp = call(api, "probe/alice-p", "hook", receiver.url + "/x", {"a": 1}, fail=True)
    assert resp.status_code == 409
    call(api, "probe/alice-p", "hook", receiver.url + "/y", {"a": 2})
    wait_until(lambda: call(api, "probe/alice-p", "get").json()["result"]["results"])
    assert [r.path for r in receiver.requests] == ["/y"]


@pytest.fixture
def claims_api(make_node: Any) -> Any:
    node = make_node(
        "n1",
        serve=True,
        types={"claimant": {"class": "support_actors:Claimant"}},
        plugins={"claims": {"class": "support_actors:ClaimsFactory"}},
    )
    with httpx.Client(base_url=node.url, timeout=15) as client:
        yield node, client


def test_a_plugins_commit_step_writes_with_the_commit_or_refuses_it_whole(
    claims_api: Any, rclient: redis.Redis, prefix: str
) -> None:
    """A plugin's own check and write run inside the commit script: a refused check
    writes nothing at all (a new actor is not even counted against its owner's quota),
    and a message that fails after buffering a step leaves no trace of it."""
    node, api = claims_api
    claims = f"{prefix}:claims"
    assert call(api, "claimant/alice-a", "claim", "x").json()["result"] == ["x"]
    assert rclient.hgetall(claims) == {b"x": b"claimant/alice-a"}
    assert node.quotas.actors_created("alice") == 1

    refused = call(api, "claimant/alice-b", "claim", "x")
    assert refused.status_code == 409
    assert refused.json()["error"]["data"] == {"holder": "claimant/alice-a"}
    assert admin.inspect(rclient, node.keys, _name("claimant/alice-b")) is None
    assert node.quotas.actors_created("alice") == 1

    failed = call(api, "claimant/alice-b", "claim", "y", then_fail=True)
    assert failed.status_code == 409 and failed.json()["error"]["message"] == "changed my mind"
    assert call(api, "claimant/alice-b", "claim", "z").json()["result"] == ["z"]
    assert call(api, "claimant/alice-a", "claim", "x").json()["result"] == ["x", "x"]  # its own
    assert rclient.hgetall(claims) == {b"x": b"claimant/alice-a", b"z": b"claimant/alice-b"}
    assert node.quotas.actors_created("alice") == 2
