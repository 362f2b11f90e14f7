"""Commitments whose behaviour is about time, on the test kit's manual clock: due
times, windows, heartbeats, expiry and retry schedules are exact, and no test waits
for them (the HTTP API, Redis and the receiver are real)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

import troth
from conftest import Receiver
from troth.core import codec
from troth.core.access import Caller
from troth.core.records import OutboxEntry
from troth.testing import ActorTestEnv


@pytest.fixture
def env(redis_url: str) -> Iterator[ActorTestEnv]:
    with ActorTestEnv({}, redis_url=redis_url, serve=True) as env:
        yield env


@pytest.fixture
def api(env: ActorTestEnv) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=env.url, timeout=15) as client:
        yield client


def commit(api: httpx.Client, receiver: Receiver, trigger: dict[str, Any], **extra: Any) -> str:
    body = {"trigger": trigger, "obligation": {"target": f"{receiver.url}/hook"}, **extra}
    resp = api.post("/v1/commitments", json=body)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def view(api: httpx.Client, cid: str) -> dict[str, Any]:
    return dict(api.get(f"/v1/commitments/{cid}").json())


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def event(api: httpx.Client, event_type: str, **payload: Any) -> None:
    resp = api.post("/v1/events", json={"event_type": event_type, "payload": payload})
    assert resp.status_code == 202, resp.text


def test_time_after_fires_exactly_when_due(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver
) -> None:
    cid = commit(api, receiver, {"type": "time_after", "delay_seconds": 3600})
    env.advance(3599.999)
    assert receiver.count() == 0 and view(api, cid)["status"] == "pending"
    env.advance(0.001)
    done = view(api, cid)
    assert done["status"] == "fulfilled" and receiver.count() == 1
    assert receiver.requests[0].body["lateness_seconds"] == 0


def test_cancel_before_due_never_delivers(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver
) -> None:
    cid = commit(api, receiver, {"type": "time_after", "delay_seconds": 60})
    assert api.delete(f"/v1/commitments/{cid}").json()["status"] == "cancelled"
    env.advance(3600)
    assert receiver.count() == 0 and view(api, cid)["status"] == "cancelled"
    again = api.delete(f"/v1/commitments/{cid}")
    assert again.status_code == 409 and again.json()["error"]["data"]["status"] == "cancelled"


def test_compound_all_window_lapses(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver
) -> None:
    trigger = {
        "type": "compound",
        "operator": "all",
        "window_seconds": 60,
        "triggers": [
            {"type": "webhook", "event_type": "p"},
            {"type": "webhook", "event_type": "q"},
        ],
    }
    cid = commit(api, receiver, trigger)
    event(api, "p")
    env.advance(61)
    event(api, "q")  # p is older than the window: not yet
    env.settle()
    assert view(api, cid)["status"] == "pending"
    env.advance(59)
    event(api, "p")  # q is 59 s old: both within the window
    env.settle()
    assert view(api, cid)["status"] == "fulfilled"


def test_heartbeat_resets_then_fires_on_silence(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver
) -> None:
    trigger = {
        "type": "heartbeat",
        "event_type": "alive",
        "filters": {"host": "db1"},
        "interval_seconds": 60,
    }
    cid = commit(api, receiver, trigger)
    for _ in range(10):  # ten minutes of heartbeats every 50 s: never silent
        env.advance(50)
        event(api, "alive", host="db1")
    event(api, "alive", host="other")  # does not match: no reset
    env.advance(59.999)
    assert view(api, cid)["status"] == "pending"
    env.advance(0.001)
    done = view(api, cid)
    assert done["status"] == "fulfilled" and done["fired_by"]["kind"] == "time"


def test_expiry(env: ActorTestEnv, api: httpx.Client, receiver: Receiver) -> None:
    expires = env.clock.now_ms() / 1000 + 300
    cid = commit(api, receiver, {"type": "webhook", "event_type": "never"}, expires_at=expires)
    env.advance(299)
    assert view(api, cid)["status"] == "pending"
    env.advance(1)
    assert view(api, cid)["status"] == "expired"
    event(api, "never")
    env.settle()
    assert receiver.count() == 0


def test_a_commitment_that_could_never_fire_is_refused(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver
) -> None:
    now = env.clock.now_ms() / 1000
    hook = {"target": f"{receiver.url}/hook"}
    never = {"type": "webhook", "event_type": "never"}
    past = api.post(
        "/v1/commitments", json={"trigger": never, "obligation": hook, "expires_at": now - 1}
    )
    assert past.status_code == 422, past.text
    assert past.json()["error"]["message"].startswith("expires_at ")
    due_later = {"type": "time_after", "timestamp": now + 600}
    batch = api.post(
        "/v1/commitments/batch",
        json={
            "commitments": [
                {"trigger": never, "obligation": hook, "expires_at": now + 300},
                {"trigger": due_later, "obligation": hook, "expires_at": now + 600},
            ]
        },
    )
    assert batch.status_code == 422, batch.text
    assert "commitments[1].expires_at" in batch.json()["error"]["message"]
    assert api.get("/v1/commitments").json()["items"] == []  # the whole batch: nothing
    # A resend of a creation that landed is answered with it, even once it expired.
    body = {"trigger": never, "obligation": hook, "expires_at": now + 300, "dedup_key": "k1"}
    first = api.post("/v1/commitments", json=body)
    assert first.status_code == 201, first.text
    env.advance(301)
    again = api.post("/v1/commitments", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] and again.json()["status"] == "expired"


def test_retries_follow_the_commitments_policy(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver
) -> None:
    receiver.script = [500, 503, 500]
    retry = {"max_attempts": 3, "initial_delay_seconds": 30, "backoff": "linear"}
    cid = commit(api, receiver, {"type": "time_after", "delay_seconds": 0}, retry_policy=retry)
    env.settle()
    assert receiver.count() == 1
    env.advance(29)
    assert receiver.count() == 1
    env.advance(1)  # attempt 2, 30 s after the first
    assert receiver.count() == 2
    env.advance(60)  # attempt 3, 60 s after the second (linear)
    done = view(api, cid)
    assert receiver.count() == 3 and done["status"] == "failed"
    assert [a["status_code"] for a in done["attempts"]] == [500, 503, 500]
    keys = {r.headers["idempotency-key"] for r in receiver.requests}
    assert keys == {cid}


def test_a_retrying_delivery_shows_its_attempts_so_far(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver
) -> None:
    """The commitment learns its delivery's attempts with the outcome; until then a
    GET shows them from the delivery's ledger entry, with the next attempt's time,
    numbered on from those of an earlier delivery when a failed one is re-driven."""
    receiver.script = [500, 502, 503]
    retry = {"max_attempts": 2, "initial_delay_seconds": 30, "backoff": "linear"}
    cid = commit(api, receiver, {"type": "webhook", "event_type": "paid"}, retry_policy=retry)
    assert view(api, cid)["next_attempt_at"] is None
    event(api, "paid")
    env.settle()
    first = view(api, cid)
    assert first["status"] == "triggered" and first["error"] is None
    assert [(a["attempt"], a["status_code"]) for a in first["attempts"]] == [(1, 500)]
    assert at(first["next_attempt_at"]) - at(first["fired_at"]) == timedelta(seconds=30)
    env.advance(30)  # the second and last attempt: 502
    failed = view(api, cid)
    assert failed["status"] == "failed" and failed["next_attempt_at"] is None
    assert [a["status_code"] for a in failed["attempts"]] == [500, 502]
    assert api.post(f"/v1/commitments/{cid}/retry").status_code == 200
    env.settle()  # the re-driven delivery's first attempt: 503
    again = view(api, cid)
    assert again["status"] == "triggered"
    numbered = [(a["attempt"], a["status_code"]) for a in again["attempts"]]
    assert numbered == [(1, 500), (2, 502), (3, 503)]
    assert at(again["next_attempt_at"]) - at(again["attempts"][2]["at"]) == timedelta(seconds=30)
    env.advance(30)
    done = view(api, cid)
    assert done["status"] == "fulfilled" and done["next_attempt_at"] is None
    assert [a["status_code"] for a in done["attempts"]] == [500, 502, 503, 200]
    statuses = [t["status"] for t in done["transitions"]]
    assert statuses == ["pending", "triggered", "failed", "triggered", "fulfilled"]


def test_a_crash_with_a_commitment_due_meanwhile_delivers_once(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver
) -> None:
    cid = commit(api, receiver, {"type": "time_after", "delay_seconds": 60})
    env.crash(down_seconds=120)
    env.settle()
    done = view(api, cid)
    assert done["status"] == "fulfilled" and receiver.count() == 1
    assert receiver.requests[0].body["lateness_seconds"] == 60


def armed_delivery(rclient: Any, prefix: str, cid: str) -> tuple[bytes, bytes, dict[str, Any]]:
    """A time-only commitment's armed delivery in its shard's outbox: key, field, entry."""
    for key in rclient.scan_iter(match=f"{prefix}:*:ob", count=1000):
        for entry_id, raw in rclient.hgetall(key).items():
            entry = codec.unpack(raw)
            if entry["kind"] == "webhook" and entry.get("idempotency_key") == cid:
                return key, entry_id, entry
    raise AssertionError(f"no delivery of {cid} in the outbox")


def test_a_time_only_commitment_is_armed_and_triggered_from_its_due_time(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver, rclient: Any
) -> None:
    """A time-only commitment commits its delivery at creation (armed) and keeps no
    timer of its own; from its due time on it is triggered, and can no longer be
    cancelled, even while the delivery waits for a retry."""
    receiver.script = [503]
    retry = {"max_attempts": 2, "initial_delay_seconds": 30}
    cid = commit(api, receiver, {"type": "time_after", "delay_seconds": 60}, retry_policy=retry)
    prefix = env.config.redis.key_prefix
    _, entry_id, entry = armed_delivery(rclient, prefix, cid)
    armed = OutboxEntry.load(entry_id, codec.pack(entry))
    assert armed.attempts == 0 and armed.spec.get("fired_ms") is None
    timers = [f for k in rclient.scan_iter(match=f"{prefix}:*:td") for f in rclient.hkeys(k)]
    assert not [f for f in timers if cid.encode() in f]
    env.advance(60)  # the first attempt: 503, the next in 30 s
    assert receiver.count() == 1
    waiting = view(api, cid)  # the attempts so far, from the delivery's ledger entry
    assert waiting["status"] == "triggered"
    assert [(a["attempt"], a["status_code"]) for a in waiting["attempts"]] == [(1, 503)]
    assert waiting["fired_at"] == waiting["due_at"] == waiting["transitions"][1]["at"]
    assert waiting["fired_by"]["kind"] == "time"
    assert at(waiting["next_attempt_at"]) - at(waiting["due_at"]) == timedelta(seconds=30)
    refused = api.delete(f"/v1/commitments/{cid}")
    assert refused.status_code == 409 and refused.json()["error"]["data"]["status"] == "triggered"
    env.advance(30)
    done = view(api, cid)
    assert done["status"] == "fulfilled" and receiver.count() == 2
    assert [t["status"] for t in done["transitions"]] == ["pending", "triggered", "fulfilled"]
    assert done["fired_at"] == done["due_at"] == done["transitions"][1]["at"]
    assert done["fired_by"]["kind"] == "time" and done["fired_by"]["path"] == "r"
    assert [a["status_code"] for a in done["attempts"]] == [503, 200]
    assert done["next_attempt_at"] is None
    bodies = [r.body for r in receiver.requests]
    assert [b["fired_at"] for b in bodies] == [bodies[0]["fired_at"]] * 2  # fired once
    assert [b["attempt"] for b in bodies] == [1, 2]


def test_a_cancel_that_loses_the_race_to_the_delivery_is_refused_and_writes_nothing(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver, rclient: Any
) -> None:
    """The delivery may begin on another node whose clock is ahead, just before the
    commitment's own clock says it is due: the cancel's commit sees the attempt the
    dispatcher recorded (the ledger's intent) and is refused, so a commitment is never
    both cancelled and delivered."""
    cid = commit(api, receiver, {"type": "time_after", "delay_seconds": 60})
    key, entry_id, entry = armed_delivery(rclient, env.config.redis.key_prefix, cid)
    rclient.hset(key, entry_id, codec.pack({**entry, "status": "attempting", "attempts": 1}))
    before = view(api, cid)
    refused = api.delete(f"/v1/commitments/{cid}")
    assert refused.status_code == 409, refused.text
    assert "its delivery began" in refused.json()["error"]["message"]
    after = view(api, cid)
    assert after == before and after["status"] == "pending"
    assert rclient.hexists(key, entry_id)


def test_a_pending_commitment_is_rescheduled_later_then_sooner(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver, rclient: Any
) -> None:
    """Snoozed, then brought forward: it is delivered once, at the last time it was
    given, under its own id, with its dedup_key kept; its earlier deliveries were
    taken back."""
    cid = commit(api, receiver, {"type": "time_after", "delay_seconds": 3600}, dedup_key="r-1")
    start = env.clock.now_ms()
    later = api.post(f"/v1/commitments/{cid}/reschedule", json={"delay_seconds": 7200})
    assert later.status_code == 200, later.text
    moved = later.json()
    assert at(moved["due_at"]).timestamp() * 1000 == start + 7_200_000
    assert moved["trigger"]["delay_seconds"] == 7200 and moved["status"] == "pending"
    assert moved["dedup_key"] == "r-1" and moved["id"] == cid
    env.advance(3600)
    assert receiver.count() == 0 and view(api, cid)["status"] == "pending"
    sooner = (start + 5_400_000) / 1000
    moved = api.post(f"/v1/commitments/{cid}/reschedule", json={"timestamp": sooner}).json()
    assert at(moved["due_at"]).timestamp() == sooner == at(moved["trigger"]["due_at"]).timestamp()
    listed = api.get("/v1/commitments", params={"dedup_key": "r-1"}).json()["items"]
    assert [i["due_at"] for i in listed] == [moved["due_at"]]  # the index follows
    env.advance(1799.999)
    assert receiver.count() == 0
    env.advance(0.001)
    assert view(api, cid)["status"] == "fulfilled" and receiver.count() == 1
    env.advance(7200)
    [req] = receiver.requests  # once: the deliveries it was armed with before are gone
    assert req.body["lateness_seconds"] == 0 and at(req.body["due_at"]).timestamp() == sooner
    assert req.headers["idempotency-key"] == cid
    with pytest.raises(AssertionError, match="no delivery"):
        armed_delivery(rclient, env.config.redis.key_prefix, cid)


def test_what_cannot_be_rescheduled_is_refused_and_writes_nothing(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver, rclient: Any
) -> None:
    def reschedule(cid: str, **when: Any) -> httpx.Response:
        return api.post(f"/v1/commitments/{cid}/reschedule", json=when)

    on_event = commit(api, receiver, {"type": "webhook", "event_type": "e"})
    refused = reschedule(on_event, delay_seconds=5)
    assert (
        refused.status_code == 409 and refused.json()["error"]["data"]["trigger_type"] == "webhook"
    )
    soon = commit(api, receiver, {"type": "time_after", "delay_seconds": 60})
    for body in ({}, {"delay_seconds": 5, "timestamp": 1e9}, {"delay_seconds": -1}):
        assert reschedule(soon, **body).status_code == 422, body
    assert reschedule("cm_" + "0" * 32, delay_seconds=5).status_code == 404
    # An expiry it could not fire before: refused; before it, moved.
    expiring = commit(
        api,
        receiver,
        {"type": "time_after", "delay_seconds": 60},
        expires_at=env.clock.now_ms() / 1000 + 120,
    )
    refused = reschedule(expiring, delay_seconds=120)
    assert refused.status_code == 422 and "expires_at" in refused.json()["error"]["message"]
    assert reschedule(expiring, delay_seconds=119).status_code == 200
    # Its delivery began (on a node whose clock is ahead): refused, nothing written.
    key, entry_id, entry = armed_delivery(rclient, env.config.redis.key_prefix, soon)
    rclient.hset(key, entry_id, codec.pack({**entry, "status": "attempting", "attempts": 1}))
    before = view(api, soon)
    refused = reschedule(soon, delay_seconds=3600)
    assert refused.status_code == 409 and "its delivery began" in refused.text
    assert view(api, soon) == before and rclient.hexists(key, entry_id)
    rclient.hset(key, entry_id, codec.pack(entry))  # (as it was: it fires when due)
    env.advance(60)
    assert view(api, soon)["status"] == "fulfilled"
    refused = reschedule(soon, delay_seconds=5)
    assert refused.status_code == 409 and refused.json()["error"]["data"]["status"] == "fulfilled"


def test_a_time_only_commitment_that_expires_before_it_is_due_is_never_delivered(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver, rclient: Any
) -> None:
    # The API refuses such a commitment (it could never fire), so it is made on the
    # actor itself: the expiry must still take back its armed delivery.
    cid = f"cm_{secrets.token_hex(16)}"
    spec = {
        "trigger": {"type": "time_after", "delay_seconds": 60},
        "obligation": {"target": f"{receiver.url}/hook"},
        "expires_at": env.clock.now_ms() / 1000 + 30,
    }
    env.call(f"commitment/local-{cid}", "create", spec, caller=Caller("local", internal=True))
    assert armed_delivery(rclient, env.config.redis.key_prefix, cid)
    env.advance(30)
    assert view(api, cid)["status"] == "expired"
    env.advance(3600)
    assert receiver.count() == 0 and view(api, cid)["status"] == "expired"
    with pytest.raises(AssertionError, match="no delivery"):
        armed_delivery(rclient, env.config.redis.key_prefix, cid)


def mentions(client: Any, prefix: str, needle: str) -> list[str]:
    """Every place under ``prefix`` that names ``needle``: key names, hash fields and
    values, set and sorted-set members, list items, stream entries."""
    found = []
    for raw in client.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode()
        if needle in key:
            found.append(key)
            continue
        kind = client.type(raw).decode()
        if kind == "hash":
            items = [b for pair in client.hgetall(raw).items() for b in pair]
        elif kind in ("set", "zset"):
            items = list(client.smembers(raw) if kind == "set" else client.zrange(raw, 0, -1))
        elif kind == "list":
            items = list(client.lrange(raw, 0, -1))
        elif kind == "stream":
            items = [v for _, entry in client.xrange(raw) for v in entry.values()]
        else:
            items = [client.get(raw) or b""]
        if any(needle.encode() in item for item in items):
            found.append(f"{key} ({kind})")
    return found


def test_retention_deletes_every_key_of_a_finished_commitment(
    redis_url: str, receiver: Receiver, rclient: Any
) -> None:
    settings = {"allow_loopback": True, "retention_seconds": 3600, "indexed_metadata": ["order"]}
    config = {"plugins": {"commitments": settings}}
    with (
        ActorTestEnv({}, redis_url=redis_url, serve=True, config=config) as env,
        httpx.Client(base_url=env.url, timeout=15) as api,
    ):
        prefix = env.config.redis.key_prefix
        meta = {"order": "o-1", "note": "not indexed"}
        done = commit(api, receiver, {"type": "time_after", "delay_seconds": 10}, metadata=meta)
        waiting = commit(api, receiver, {"type": "time_after", "delay_seconds": 86_400})
        on_event = commit(api, receiver, {"type": "webhook", "event_type": "e"})
        cancelled = commit(
            api, receiver, {"type": "webhook", "event_type": "e"}, dedup_key="once", metadata=meta
        )
        api.delete(f"/v1/commitments/{cancelled}")
        env.advance(10)
        assert view(api, done)["status"] == "fulfilled"
        assert mentions(rclient, prefix, done)  # kept during its retention
        assert f"{prefix}:{{cm:local}}:m:5:order=o-1 (zset)" in mentions(rclient, prefix, done)
        env.advance(3599)
        assert view(api, done)["status"] == "fulfilled"
        env.advance(1)

        for gone in (done, cancelled):
            # Left: the tombstone, and the request ids of its (un)subscribe messages in
            # the event bus's reply cache, which are the bus's and expire with
            # runtime.reply_cache_seconds.
            left = [
                m
                for m in mentions(rclient, prefix, gone)
                if ":rp:cmbus/" not in m and ":rpt:cmbus/" not in m
            ]
            assert left == [f"{prefix}:{{cm:local}}:gone:{gone}"]
            resp = api.get(f"/v1/commitments/{gone}")
            assert resp.status_code == 404 and "was retired" in resp.json()["error"]["message"]
        for kept in (waiting, on_event):
            assert view(api, kept)["status"] == "pending"
        listed = [c["id"] for c in api.get("/v1/commitments").json()["items"]]
        assert sorted(listed) == sorted([waiting, on_event])
        # The dedup_key of a retired commitment is free again; events still fire the rest.
        again = commit(api, receiver, {"type": "webhook", "event_type": "e"}, dedup_key="once")
        assert again != cancelled
        event(api, "e")
        env.settle()
        assert view(api, on_event)["status"] == "fulfilled"
        assert view(api, again)["status"] == "fulfilled"


def test_a_retried_commitment_is_kept_for_its_retention_from_its_new_end(
    redis_url: str, receiver: Receiver
) -> None:
    config = {"plugins": {"commitments": {"allow_loopback": True, "retention_seconds": 3600}}}
    with (
        ActorTestEnv({}, redis_url=redis_url, serve=True, config=config) as env,
        httpx.Client(base_url=env.url, timeout=15) as api,
    ):
        receiver.script = [500]
        once = {"max_attempts": 1}
        cid = commit(api, receiver, {"type": "time_after", "delay_seconds": 0}, retry_policy=once)
        env.settle()
        assert view(api, cid)["status"] == "failed"
        env.advance(1800)
        assert api.post(f"/v1/commitments/{cid}/retry").status_code == 200
        env.settle()
        assert view(api, cid)["status"] == "fulfilled"
        env.advance(1800)  # the failure's retention would end here: it ended again since
        assert view(api, cid)["status"] == "fulfilled"
        env.advance(1800)
        assert api.get(f"/v1/commitments/{cid}").status_code == 404


def test_a_create_keeps_no_cached_reply(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver, rclient: Any
) -> None:
    """create is idempotent by itself: it is called without a request id, so no reply
    is stored for it (about 1 KB of Redis per commitment saved)."""
    cid = commit(api, receiver, {"type": "time_after", "delay_seconds": 60})
    env.settle()
    name = f"commitment/local-{cid}"
    prefix = env.config.redis.key_prefix
    assert [k for k in rclient.scan_iter(match=f"{prefix}:*:rp*:{name}")] == []
    # A repeated create of the same commitment (a retry) changes nothing.
    again = env.call(name, "create", {}, caller=troth.Caller("local", internal=True))
    assert again["id"] == cid and again["rev"] == 1


def test_a_commitment_the_api_did_not_subscribe_subscribes_itself_later(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver, rclient: Any
) -> None:
    """The API subscribes a new commitment before answering; if its node died before
    that, a commitment still waiting 30 s later subscribes itself. One cancelled
    meanwhile does not (its timer went with it)."""
    spec = {
        "trigger": {"type": "webhook", "event_type": "late"},
        "obligation": {"target": f"{receiver.url}/hook"},
    }
    caller = troth.Caller("local", internal=True)
    orphan, gone = (f"commitment/local-cm_{c * 32}" for c in "ab")
    for name in (orphan, gone):  # created as if the API's node died right after
        env.call(name, "create", dict(spec), caller=caller)
    env.call(gone, "cancel", caller=caller)
    event(api, "late")
    env.settle()
    assert receiver.count() == 0  # nobody subscribed yet
    env.advance(30)
    env.settle()
    prefix = env.config.redis.key_prefix
    (bus,) = rclient.scan_iter(match=f"{prefix}:*:mb:cmbus/local-*")
    assert rclient.smembers(bus) == {orphan.encode()}
    event(api, "late")
    env.settle()
    assert receiver.count() == 1
    assert receiver.requests[0].body["commitment_id"] == "cm_" + "a" * 32
    assert view(api, "cm_" + "a" * 32)["status"] == "fulfilled"
    assert view(api, "cm_" + "b" * 32)["status"] == "cancelled"


def test_far_work_waits_in_redis_not_in_the_nodes_memory(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver
) -> None:
    """A node holds in memory only the timers and deliveries due within the next two
    minutes: a delivery due in two days, an expiry next week and a finished
    commitment's retire timer wait in Redis (a node claiming their shard reads none of
    them), and each still happens exactly on time, after a crash too."""
    day = 86_400
    far = commit(api, receiver, {"type": "time_after", "delay_seconds": 2 * day})
    soon = commit(api, receiver, {"type": "time_after", "delay_seconds": 30})
    expires = env.clock.now_ms() / 1000 + 7 * day
    expiring = commit(api, receiver, {"type": "webhook", "event_type": "never"}, expires_at=expires)
    env.advance(60)
    assert view(api, soon)["status"] == "fulfilled" and receiver.count() == 1
    env.crash()
    assert (len(env.node.scheduler), len(env.node.dispatcher)) == (0, 0)
    shards = [env.keys.shard(s) for s in range(env.config.cluster.shards)]
    assert sum(env.client.zcard(sk.timers) for sk in shards) == 2  # retire, expiry
    assert sum(env.client.zcard(sk.outbox_queue) for sk in shards) == 1  # the armed delivery
    env.advance(2 * day - 60)
    assert view(api, far)["status"] == "fulfilled" and receiver.count() == 2
    late = {r.body["commitment_id"]: r.body["lateness_seconds"] for r in receiver.requests}
    assert late == {far: 0, soon: 0}
    gone = api.get(f"/v1/commitments/{soon}")  # retired a day after it was fulfilled
    assert gone.status_code == 404 and "was retired" in gone.json()["error"]["message"]
    assert view(api, expiring)["status"] == "pending"
    env.advance(5 * day - 1)
    assert view(api, expiring)["status"] == "pending"
    env.advance(1)
    assert view(api, expiring)["status"] == "expired" and receiver.count() == 2


def test_a_commitment_due_later_leaves_memory_once_created(
    env: ActorTestEnv, api: httpx.Client, receiver: Receiver
) -> None:
    """A time-only commitment due later than its actor would stay in memory is let go
    as soon as it is created (a burst of creations holds no cell each); one due sooner
    stays, so that its delivery's outcome needs no load. Both are delivered on time."""
    later = commit(api, receiver, {"type": "time_after", "delay_seconds": 3600})
    soon = commit(api, receiver, {"type": "time_after", "delay_seconds": 10})
    env.settle()
    active = set(env.node.engine.cells)
    assert f"commitment/local-{soon}" in active and f"commitment/local-{later}" not in active
    env.advance(3600)
    assert view(api, later)["status"] == view(api, soon)["status"] == "fulfilled"
    late = {r.body["commitment_id"]: r.body["lateness_seconds"] for r in receiver.requests}
    assert late == {later: 0, soon: 0}
