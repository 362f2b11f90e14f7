"""The commitments client (``troth.caas.client``), sync and asyncio, against a real node
and a real receiver; its resend rules as pure logic on httpx's mock transport."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pydantic
import pytest
import redis
import standardwebhooks

from conftest import NodeProcess, Receiver, on_cluster_too, wait_until
from troth.caas import delivery, signing
from troth.caas.client import AsyncCommitments, Commitments
from troth.caas.delivery import new_secret
from troth.caas.models import Commitment
from troth.caas.plugin import CommitmentsFactory
from troth.core.config import ConfigError
from troth.core.errors import AppError, AuthError, BadRequestError, CallTimeout, NotFoundError
from troth.edge.server import ServerThread
from troth.node import Node

KEY_A, KEY_B = "a" * 16, "b" * 16


@pytest.fixture
def keyed(make_node: Callable[..., Node]) -> Node:
    return make_node("n1", serve=True, auth={"api_keys": {KEY_A: "a", KEY_B: "b"}})


@pytest.fixture
def cs(keyed: Node) -> Iterator[Commitments]:
    assert keyed.url is not None
    with Commitments(keyed.url, token=KEY_A, timeout=15) as client:
        yield client


def settled(cs: Commitments, cid: str, want: str = "fulfilled") -> Commitment:
    wait_until(lambda: cs.get(cid).status == want, timeout=10)
    return cs.get(cid)


def test_create_get_and_a_signed_delivery(cs: Commitments, receiver: Receiver) -> None:
    due = datetime.now(UTC) + timedelta(seconds=0.3)
    c = cs.create(
        {"type": "time_after", "timestamp": due},
        {"target": receiver.url + "/hook", "payload": {"order": 17}},
        dedup_key="order-17",
        metadata={"customer": "c1"},
    )
    assert c.status == "pending" and c.id.startswith("cm_")
    assert c.due_at is not None and abs((c.due_at - due).total_seconds()) < 0.002
    assert c.metadata == {"customer": "c1"} and c.dedup_key == "order-17"
    again = cs.create(
        {"type": "time_after", "delay_seconds": 99}, {"target": receiver.url}, dedup_key="order-17"
    )
    assert again.id == c.id and again.due_at == c.due_at  # the first one, unchanged
    done = settled(cs, c.id)
    assert [(a.attempt, a.status_code) for a in done.attempts] == [(1, 200)]
    assert [t.status for t in done.transitions] == ["pending", "triggered", "fulfilled"]
    assert done.fired_at is not None and done.retires_at is not None
    [req] = receiver.requests
    got = delivery.receive(cs.secret(), req.headers, req.raw)
    assert got.commitment_id == c.id and got.payload == {"order": 17} and got.attempt == 1
    assert got.due_at == done.due_at and got.fired_at == done.fired_at
    assert got.trigger == {"kind": "time", "path": "r", "due_at": req.body["due_at"]}
    for secret, body, now in (
        ("whsec_" + "A" * 32, req.raw, None),  # another principal's secret
        (cs.secret(), req.raw.replace(b"17", b"18"), None),  # tampered with
        (cs.secret(), req.raw, time.time() + 301),  # replayed 5 minutes later
    ):
        with pytest.raises(delivery.InvalidSignature):
            delivery.receive(secret, req.headers, body, now)


def test_deliveries_verify_with_the_standard_webhooks_reference(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    """Any Standard Webhooks library verifies troth's deliveries: here the reference
    implementation, with a configured secret and with a principal's random one."""
    configured = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    commitments = {
        "allow_loopback": True,
        "timeout_seconds": 2,
        "signing_secrets": {"a": configured},
    }
    node = make_node(
        "n1",
        serve=True,
        auth={"api_keys": {KEY_A: "a", KEY_B: "b"}},
        plugins={"commitments": commitments},
    )
    assert node.url is not None
    for key in (KEY_A, KEY_B):
        with Commitments(node.url, token=key, timeout=15) as cs:
            secret = cs.secret()
            assert (secret == configured) is (key == KEY_A)
            c = cs.create({"type": "time_after", "delay_seconds": 0}, {"target": receiver.url})
            settled(cs, c.id)
            [req] = [r for r in receiver.requests if r.body["commitment_id"] == c.id]
            assert standardwebhooks.Webhook(secret).verify(req.raw, req.headers) == req.body
            with pytest.raises(standardwebhooks.WebhookVerificationError):
                standardwebhooks.Webhook(new_secret()).verify(req.raw, req.headers)


def test_a_signing_secret_no_standard_library_reads_is_refused(
    make_node: Callable[..., Node],
) -> None:
    for bad in ("hunter2-but-longer-than-24", "whsec_" + "A" * 8, "whsec_" + "A" * 90, "whsec_x y"):
        settings = {"allow_loopback": True, "signing_secrets": {"acme": bad}}
        with pytest.raises(ConfigError) as refused:
            make_node("n1", plugins={"commitments": settings})
        message = str(refused.value)
        assert "plugins.commitments.signing_secrets" in message and "'acme'" in message
        assert bad not in message  # a secret is never echoed


def test_found_by_dedup_key_and_searched_by_metadata(
    keyed: Node, cs: Commitments, receiver: Receiver
) -> None:
    """A tenant finds its commitment by its own business key (to cancel it, say)
    and searches by metadata; another tenant finds none of them."""
    assert keyed.url is not None
    later = {"type": "time_after", "delay_seconds": 3600}
    target = {"target": receiver.url}
    first = cs.create(later, target, metadata={"customer": "c1"})
    keyed_one = cs.create(later, target, dedup_key="order-9", metadata={"customer": "c2"})
    newest = cs.create(later, target, metadata={"customer": "c1", "tier": 2})
    found = cs.find("order-9")
    assert found is not None and found.id == keyed_one.id and found.dedup_key == "order-9"
    assert cs.find("order-10") is None
    page = cs.search({"customer": "c1"})
    assert [c.id for c in page.items] == [newest.id, first.id] and not page.truncated
    assert [c.id for c in cs.search({"tier": "2"}).items] == [newest.id]  # compared as text
    cs.cancel(first.id)
    assert [c.id for c in cs.search({"customer": "c1"}, status="cancelled").items] == [first.id]
    assert cs.search({"customer": "c1"}, trigger_type="webhook").items == []
    assert [c.id for c in cs.search({"customer": "c1"}, limit=1).items] == [newest.id]
    with Commitments(keyed.url, token=KEY_B) as other:
        assert other.find("order-9") is None and other.search({"customer": "c1"}).items == []
    for bad in ({}, {"customer": "c1", "tier": "2"}):
        with pytest.raises(ValueError):
            cs.search(bad)
    headers = {"authorization": f"Bearer {KEY_A}"}
    for params in (
        {"dedup_key": "order-9", "metadata": "customer=c1"},
        {"dedup_key": "order-9", "cursor": f"1:cm_{'0' * 32}"},
        {"metadata": "customer"},
    ):
        resp = httpx.get(f"{keyed.url}/v1/commitments", params=params, headers=headers)
        assert resp.status_code == 422, (params, resp.text)


@on_cluster_too
def test_an_indexed_metadata_key_is_searched_exactly_a_page_at_a_time(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    """A key listed in ``indexed_metadata`` is searched through its index: exact,
    newest first, a page at a time. Commitments created before it was listed are
    found too: the first search builds the index (and scans meanwhile). A node that
    starts without the key ends the index's generation; listed again, the index is
    built afresh, with what that node created meanwhile."""
    auth = {"api_keys": {KEY_A: "a", KEY_B: "b"}}
    plain = {"commitments": {"allow_loopback": True}}
    indexed = {"commitments": {"allow_loopback": True, "indexed_metadata": ["customer", "vip"]}}
    later = {"type": "time_after", "delay_seconds": 3600}
    target = {"target": receiver.url}
    created: list[str] = []  # customer c1, oldest first

    @contextlib.contextmanager
    def client(name: str, plugins: dict[str, Any]) -> Iterator[Commitments]:
        """A node serving its API for the block; stopped after it."""
        node = make_node(name, auth=auth, plugins=plugins)
        server = ServerThread(node).start()
        try:
            with Commitments(server.url, token=KEY_A) as cs:
                yield cs
        finally:
            server.stop()
            node.stop()

    def every_page(cs: Commitments, query: dict[str, str], **filters: Any) -> list[str]:
        ids, cursor = [], None
        while True:
            page = cs.search(query, limit=2, cursor=cursor, **filters)
            ids += [c.id for c in page.items]
            if page.next_cursor is None:
                return ids
            cursor = page.next_cursor

    def indexed_search(cs: Commitments) -> None:
        """Search until the index is built (the searches before it scan: one page)."""
        wait_until(lambda: cs.search({"customer": "c1"}, limit=2).next_cursor is not None)
        assert every_page(cs, {"customer": "c1"}) == created[::-1]

    with client("n1", plain) as cs:
        for i in range(3):
            created.append(cs.create(later, target, metadata={"customer": "c1", "n": i}).id)
        cs.create(later, target, metadata={"customer": "c2"})
        long = cs.create(later, target, metadata={"customer": "x" * 201}).id  # never indexed

    with client("n2", indexed) as cs:
        created.append(cs.create(later, target, metadata={"customer": "c1", "vip": True}).id)
        page = cs.search({"customer": "c1"}, limit=2)  # builds the index, scans meanwhile
        assert [c.id for c in page.items] == created[:-3:-1]
        indexed_search(cs)
        assert every_page(cs, {"vip": "true"}) == [created[-1]]  # JSON's text of true
        cs.cancel(created[0])
        assert every_page(cs, {"customer": "c1"}, status="cancelled") == [created[0]]
        assert every_page(cs, {"customer": "c1"}, status="pending") == created[:0:-1]
        assert [c.id for c in cs.search({"customer": "x" * 201}).items] == [long]  # a scan
        with pytest.raises(BadRequestError, match="not indexed"):
            cs.search({"n": "1"}, cursor="1:cm_" + "0" * 32)
        with Commitments(cs.urls[0], token=KEY_B) as other:
            assert other.search({"customer": "c1"}).items == []

    with client("n3", plain) as cs:  # ends the index's generation
        created.append(cs.create(later, target, metadata={"customer": "c1"}).id)

    with client("n4", indexed) as cs:
        indexed_search(cs)  # with what n3 created, unindexed


@on_cluster_too
def test_a_commitment_brought_forward_is_delivered_then(
    keyed: Node, cs: Commitments, receiver: Receiver
) -> None:
    c = cs.create({"type": "time_after", "delay_seconds": 3600}, {"target": receiver.url})
    later = datetime.now(UTC) + timedelta(hours=2)
    moved = cs.reschedule(c.id, later)
    assert moved.due_at is not None and abs((moved.due_at - later).total_seconds()) < 0.002
    [listed] = list(cs.list())
    assert listed.due_at == moved.due_at  # the listing follows at once, on a cluster too
    cs.reschedule(c.id, delay_seconds=0.2)
    done = settled(cs, c.id)
    [req] = receiver.requests
    assert req.body["commitment_id"] == c.id and done.due_at is not None
    assert done.due_at - c.created_at < timedelta(seconds=5)
    with pytest.raises(AppError, match="fulfilled"):
        cs.reschedule(c.id, delay_seconds=5)
    with pytest.raises(pydantic.ValidationError):
        cs.reschedule(c.id)  # neither a time nor a delay


def test_indexed_metadata_keys_are_checked(make_node: Callable[..., Node]) -> None:
    for keys, why in (
        (["a", "a"], "once"),
        (["a=b"], "no '='"),
        ([f"k{i}" for i in range(17)], "at most 16"),
        ([""], "at least 1"),
    ):
        with pytest.raises(ConfigError, match="indexed_metadata") as refused:
            make_node("n1", plugins={"commitments": {"indexed_metadata": keys}})
        assert why in str(refused.value)


def delivered(cs: Commitments, receiver: Receiver) -> tuple[bytes, dict[str, str]]:
    """A delivery made now: its body and headers as received."""
    c = cs.create({"type": "time_after", "delay_seconds": 0}, {"target": receiver.url})
    settled(cs, c.id)
    [req] = [r for r in receiver.requests if r.body["commitment_id"] == c.id]
    return req.raw, req.headers


def verifies(secret: str, raw: bytes, headers: dict[str, str]) -> bool:
    """Whether the Standard Webhooks reference library accepts the delivery."""
    try:
        standardwebhooks.Webhook(secret).verify(raw, headers)
    except standardwebhooks.WebhookVerificationError:
        return False
    return True


@on_cluster_too
def test_a_rotated_secret_signs_beside_the_previous_one_for_a_while(
    keyed: Node, cs: Commitments, receiver: Receiver
) -> None:
    """A rotation without a lost delivery: the new secret signs at once, the previous
    one beside it until it expires; a rotation with no grace ends it at once (a
    leak). Another principal's secret is untouched."""
    assert keyed.url is not None
    first = cs.secret_info()
    assert not first.configured and first.rotated_at is None
    with Commitments(keyed.url, token=KEY_B) as other:
        b_secret = other.secret()
    started = datetime.now(UTC)
    rotated = cs.rotate_secret(keep_previous_seconds=3600)
    second = rotated.secret
    assert second != first.secret and cs.secret() == second and not rotated.configured
    assert rotated.rotated_at is not None and rotated.previous_expires_at is not None
    assert abs((rotated.rotated_at - started).total_seconds()) < 2
    until = rotated.previous_expires_at - rotated.rotated_at
    assert abs(until.total_seconds() - 3600) < 0.002
    assert rotated.signing_everywhere_at == rotated.rotated_at + timedelta(seconds=10)
    raw, headers = delivered(cs, receiver)
    assert len(headers["webhook-signature"].split()) == 2
    assert verifies(second, raw, headers) and verifies(first.secret, raw, headers)
    assert delivery.receive([new_secret(), second], headers, raw).attempt == 1

    third = cs.rotate_secret(keep_previous_seconds=0)  # the last one leaked
    assert third.secret not in (first.secret, second) and third.previous_expires_at is None
    raw, headers = delivered(cs, receiver)
    assert len(headers["webhook-signature"].split()) == 1
    assert verifies(third.secret, raw, headers)
    assert not verifies(second, raw, headers) and not verifies(first.secret, raw, headers)
    assert cs.secret_info().previous_expires_at is None
    with Commitments(keyed.url, token=KEY_B) as other:
        assert other.secret() == b_secret


def test_a_rotation_reaches_every_node_within_the_refresh(
    make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another node signs with the new secret, beside the previous one, once it reads
    the secrets again (``REFRESH_SECONDS``; 0.5 s here)."""
    monkeypatch.setattr(signing, "REFRESH_SECONDS", 0.5)
    auth = {"api_keys": {KEY_A: "a"}}
    n1, n2 = make_node("n1", serve=True, auth=auth), make_node("n2", auth=auth)
    assert n1.url is not None

    def signing_on_n2() -> tuple[str, ...]:
        factory = n2.plugin_factories["commitments"]
        assert isinstance(factory, CommitmentsFactory)
        secrets = factory.secrets
        now_ms = int(time.time() * 1000)
        return asyncio.run_coroutine_threadsafe(secrets.signing("a", now_ms), n2.loop).result()

    with Commitments(n1.url, token=KEY_A) as cs:
        old = cs.secret()
        assert signing_on_n2() == (old,)
        new = cs.rotate_secret().secret
    wait_until(lambda: signing_on_n2() == (new, old), timeout=3)


def test_a_previous_secret_is_deleted_from_redis_once_its_grace_period_ends(
    make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retired secret is not kept at rest: the next read of the secrets after its
    grace period deletes it (and a rotation made meanwhile keeps its own previous)."""
    monkeypatch.setattr(signing, "REFRESH_SECONDS", 0.2)
    n1 = make_node("n1", serve=True, auth={"api_keys": {KEY_A: "a"}})
    assert n1.url is not None
    key = f"{n1.keys.prefix}:signing:a"
    with Commitments(n1.url, token=KEY_A) as cs:
        old = cs.secret()
        rotated = cs.rotate_secret(keep_previous_seconds=2)
        new, ends = rotated.secret, rotated.previous_expires_at
        assert ends is not None and n1.client.hget(key, "previous") == old.encode()
        time.sleep(0.3)
        assert cs.secret_info().previous_expires_at == ends  # read again: still signing
        assert n1.client.hget(key, "previous") == old.encode()
        time.sleep(max(0.0, (ends - datetime.now(UTC)).total_seconds()) + 0.3)
        info = cs.secret_info()
        assert info.secret == new and info.previous_expires_at is None
        assert n1.client.hmget(key, "previous", "previous_until_ms") == [None, None]
        assert n1.client.hget(key, "current") == new.encode()
        newest = cs.rotate_secret(keep_previous_seconds=3600).secret
        cs.secret_info()
        assert n1.client.hget(key, "previous") == new.encode()
        assert cs.secret() == newest


def test_configured_secrets_all_sign_and_rotate_in_the_configuration(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    newer, older = new_secret(), new_secret()
    settings = {"allow_loopback": True, "signing_secrets": {"a": [newer, older]}}
    node = make_node(
        "n1", serve=True, auth={"api_keys": {KEY_A: "a"}}, plugins={"commitments": settings}
    )
    assert node.url is not None
    with Commitments(node.url, token=KEY_A, timeout=15) as cs:
        info = cs.secret_info()
        assert info.secret == newer and info.configured and info.rotated_at is None
        raw, headers = delivered(cs, receiver)
        assert verifies(newer, raw, headers) and verifies(older, raw, headers)
        with pytest.raises(AppError, match=r"plugins\.commitments\.signing_secrets"):
            cs.rotate_secret()
        assert cs.secret() == newer
    for bad in ([], [newer, newer], [newer] * 5):
        refused = {"allow_loopback": True, "signing_secrets": {"a": bad}}
        with pytest.raises(ConfigError, match="distinct secrets"):
            make_node("n2", plugins={"commitments": refused})


def test_a_secret_kept_before_rotation_existed_is_carried_over(
    make_node: Callable[..., Node], redis_url: str, prefix: str
) -> None:
    """A principal's random secret as troth kept it before (a string key) stays its
    secret after an upgrade, and its old key goes."""
    kept = new_secret()
    r = redis.Redis.from_url(redis_url)
    r.set(f"{prefix}:whsec:a", kept)
    node = make_node("n1", serve=True, auth={"api_keys": {KEY_A: "a"}})
    assert node.url is not None
    with Commitments(node.url, token=KEY_A) as cs:
        assert cs.secret() == kept
        assert not r.exists(f"{prefix}:whsec:a")
        assert cs.rotate_secret().secret != kept


def test_an_operator_rotates_a_principals_secret(make_node: Callable[..., Node]) -> None:
    """A leaked secret, rotated by an operator with no grace; a tenant may not."""
    ops, reader = "o" * 16, "r" * 16
    node = make_node(
        "n1",
        serve=True,
        auth={
            "api_keys": {KEY_A: "a", KEY_B: "b", ops: "ops", reader: "audit"},
            "operators": {"ops": "write", "audit": "read"},
        },
    )
    assert node.url is not None
    where = f"{node.url}/v1/admin/commitments-secret/a"
    as_reader = {"authorization": f"Bearer {reader}"}
    # An operator who reads sees where it stands, never the secret; reading makes none.
    assert httpx.get(where, headers=as_reader).json() == {
        "principal": "a",
        "made": False,
        "configured": False,
    }
    with Commitments(node.url, token=KEY_A) as cs:
        leaked = cs.secret()
    seen = httpx.get(where, headers=as_reader).json()
    assert seen["made"] and seen["rotated_at"] is None and "secret" not in seen
    assert httpx.get(where, headers={"authorization": f"Bearer {KEY_A}"}).status_code == 403
    path = f"{where}/rotate"
    for key, status in ((KEY_B, 403), (reader, 403), (None, 401)):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        assert httpx.post(path, headers=headers).status_code == status
    resp = httpx.post(
        path, json={"keep_previous_seconds": 0}, headers={"authorization": f"Bearer {ops}"}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["principal"] == "a" and body["previous_expires_at"] is None
    with Commitments(node.url, token=KEY_A) as cs:
        assert cs.secret() == body["secret"] != leaked
    seen = httpx.get(where, headers=as_reader).json()
    assert seen["rotated_at"] == body["rotated_at"] and seen["previous_expires_at"] is None
    assert leaked not in str(seen) and body["secret"] not in str(seen)
    bad = httpx.post(
        f"{node.url}/v1/admin/commitments-secret/A!/rotate",
        headers={"authorization": f"Bearer {ops}"},
    )
    assert bad.status_code == 422


def test_a_rotation_is_bounded(keyed: Node, cs: Commitments) -> None:
    assert keyed.url is not None
    for keep in (-1, 31 * 86_400):
        with pytest.raises(pydantic.ValidationError):
            cs.rotate_secret(keep_previous_seconds=keep)
        resp = httpx.post(
            f"{keyed.url}/v1/commitments-secret/rotate",
            json={"keep_previous_seconds": keep},
            headers={"authorization": f"Bearer {KEY_A}"},
        )
        assert resp.status_code == 422, resp.text
        assert "keep_previous_seconds" in resp.text
    assert cs.secret_info().rotated_at is None  # nothing rotated


def test_events_fire_once_per_key(cs: Commitments, receiver: Receiver) -> None:
    c = cs.create(
        {"type": "webhook", "event_type": "paid", "filters": {"amount_gte": 100}},
        {"target": receiver.url},
    )
    assert cs.publish("paid", {"amount": 5}).delivered_to == 1  # reached, did not match
    first = cs.publish("paid", {"amount": 150}, event_key="pay-1")
    second = cs.publish("paid", {"amount": 150}, event_key="pay-1")
    assert not first.duplicate and second.duplicate and second.delivered_to == 0
    done = settled(cs, c.id)
    assert done.fired_by is not None and done.fired_by["event"]["payload"] == {"amount": 150}
    assert receiver.count() == 1


def test_listing_pages_cancel_and_errors(cs: Commitments, keyed: Node, receiver: Receiver) -> None:
    made = cs.create_many(
        [
            {
                "trigger": {"type": "webhook", "event_type": f"e{i}"},
                "obligation": {"target": receiver.url},
            }
            for i in range(5)
        ]
    )
    assert len(made) == 5 and len({c.id for c in made}) == 5
    listed = list(cs.list(status="pending", limit=2))  # three pages
    assert {s.id for s in listed} == {c.id for c in made} and len(listed) == 5
    order = [(s.created_at, s.id) for s in listed]
    assert order == sorted(order, reverse=True)  # newest first (a batch's: by id)
    assert all(s.trigger_type == "webhook" and s.attempts == 0 for s in listed)
    assert cs.cancel(made[0].id).status == "cancelled"
    with pytest.raises(AppError) as refused:
        cs.cancel(made[0].id)
    assert refused.value.data == {"status": "cancelled"}
    results = cs.cancel_many([made[1].id, "cm_" + "0" * 32])
    assert results[0].status == "cancelled" and results[1].error is not None
    assert results[1].error.type == "NotFoundError"
    with pytest.raises(NotFoundError):
        cs.get("cm_" + "0" * 32)
    assert keyed.url is not None
    with Commitments(keyed.url, token=KEY_B) as other:  # another principal sees none
        assert list(other.list()) == []
        with pytest.raises(NotFoundError):
            other.get(made[2].id)
    with Commitments(keyed.url, token="x" * 16) as stranger, pytest.raises(AuthError):
        stranger.get(made[2].id)


def test_bad_input_is_refused_before_anything_is_sent(cs: Commitments) -> None:
    with pytest.raises(pydantic.ValidationError, match="delay_seconds"):
        cs.create({"type": "time_after", "delay_seconds": -1}, {"target": "http://x.example"})
    with pytest.raises(pydantic.ValidationError, match="scheme"):
        cs.create({"type": "webhook", "event_type": "e"}, {"target": "ftp://x.example"})
    with pytest.raises(ValueError, match="not a commitment id"):
        cs.get("../admin")
    assert list(cs.list()) == []


def test_async_client_and_a_dead_node_first(keyed: Node, receiver: Receiver) -> None:
    with socket.socket() as s:  # a port nobody listens on: the first URL is down
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert keyed.url is not None

    async def run() -> None:
        async with AsyncCommitments([dead, keyed.url], token=KEY_A, timeout=15) as cs:
            c = await cs.create(
                {"type": "tool_complete", "tool_id": "t1"}, {"target": receiver.url}
            )
            assert (await cs.publish("tool_complete", {"tool_id": "t1"})).delivered_to == 1
            for _ in range(100):
                if (await cs.get(c.id)).status == "fulfilled":
                    break
                await asyncio.sleep(0.1)
            assert [s.status async for s in cs.list()] == ["fulfilled"]
            assert (await cs.secret()).startswith("whsec_")

    asyncio.run(run())
    assert receiver.count() == 1


# -- resends: pure logic, on httpx's mock transport ------------------------------------


def scripted(*answers: int | type[httpx.TransportError]) -> tuple[httpx.MockTransport, list[str]]:
    """A transport answering each request with the next of ``answers``: a status (with
    a commitment or an error body) or a transport error raised."""
    sent: list[str] = []
    view = {
        "id": "cm_" + "1" * 32,
        "status": "pending",
        "trigger": {"type": "webhook", "event_type": "e"},
        "obligation": {"target": "http://x.example"},
        "retry_policy": {},
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(f"{request.method} {request.url.host}")
        answer = answers[len(sent) - 1]
        if not isinstance(answer, int):
            raise answer("scripted", request=request)
        if answer == 503:
            error = {"type": "UnavailableError", "message": "moving"}
            return httpx.Response(503, json={"error": error}, headers={"retry-after": "0"})
        return httpx.Response(answer, json=view)

    return httpx.MockTransport(handle), sent


def client(transport: httpx.MockTransport) -> Commitments:
    return Commitments(["http://a.test", "http://b.test"], timeout=5, transport=transport)


def create(cs: Commitments, **extra: Any) -> Commitment:
    trigger = {"type": "webhook", "event_type": "e"}
    return cs.create(trigger, {"target": "http://x.example"}, **extra)


def test_a_503_is_sent_again_after_its_retry_after() -> None:
    transport, sent = scripted(503, 503, 201)
    assert create(client(transport)).id == "cm_" + "1" * 32
    assert sent == ["POST a.test"] * 3


def test_an_unsent_request_goes_to_the_next_node_which_the_next_ones_try_first() -> None:
    transport, sent = scripted(httpx.ConnectError, 201, 201)
    cs = client(transport)
    create(cs)
    create(cs)
    assert sent == ["POST a.test", "POST b.test", "POST b.test"]


def test_a_lost_answer_is_resent_only_when_that_is_harmless() -> None:
    transport, sent = scripted(httpx.ReadError)
    with pytest.raises(CallTimeout, match="may have been applied"):
        create(client(transport))  # no dedup_key: a second might make a second
    assert sent == ["POST a.test"]
    transport, sent = scripted(httpx.ReadError, 200)
    create(client(transport), dedup_key="k")
    transport, reads = scripted(httpx.RemoteProtocolError, 200)
    client(transport).get("cm_" + "1" * 32)
    assert sent == ["POST a.test", "POST b.test"] and reads == ["GET a.test", "GET b.test"]


# -- through a kill -9 -----------------------------------------------------------------


@pytest.mark.slow
def test_creates_through_a_kill9_of_one_of_two_nodes_land_once_each(
    spawn: Callable[..., NodeProcess], receiver: Receiver
) -> None:
    """A client creating one commitment after another (each with its dedup_key) while
    one of its two nodes is killed: every create answers, none twice, none is lost,
    and each is delivered under its one key."""
    n = 300
    nodes = [spawn(f"p{i}").start() for i in (1, 2)]
    wait_until(lambda: all(httpx.get(p.url + "/health").json()["shards"] < 64 for p in nodes))
    made: list[str] = []

    def create_all() -> None:
        with Commitments([p.url for p in nodes], timeout=30) as cs:
            for i in range(n):
                trigger = {"type": "time_after", "delay_seconds": 4}
                c = cs.create(trigger, {"target": receiver.url}, dedup_key=f"k{i}")
                made.append(c.id)

    creator = threading.Thread(target=create_all)
    creator.start()
    wait_until(lambda: len(made) >= n // 3, timeout=30)
    nodes[0].kill()
    at_kill = len(made)
    creator.join(timeout=90)
    assert not creator.is_alive() and len(made) == n
    assert at_kill < n, "the kill came after every create: the test proved nothing"
    assert len(set(made)) == n  # a resent create found its first one, never made two
    with Commitments(nodes[1].url, timeout=30) as cs:
        assert {s.id for s in cs.list()} == set(made)
        wait_until(lambda: len({r.headers["idempotency-key"] for r in receiver.requests}) >= n, 60)
        assert {r.headers["idempotency-key"] for r in receiver.requests} == set(made)
        wait_until(lambda: {s.status for s in cs.list()} == {"fulfilled"}, timeout=30)


def test_a_malformed_request_the_node_refuses_raises_bad_request() -> None:
    """A node's own 422 (a rule newer than this client, say) is troth's BadRequestError."""
    problem = {"type": "ValidationError", "message": "query.limit: too large", "data": []}
    transport = httpx.MockTransport(lambda _: httpx.Response(422, json={"error": problem}))
    with pytest.raises(BadRequestError, match="too large"):
        client(transport).get("cm_" + "1" * 32)
    with pytest.raises(ValueError, match="between 1 and 500"):
        list(client(transport).list(limit=501))


def test_the_client_loads_no_node() -> None:
    """An agent that only makes promises imports the client, not the node's HTTP stack."""
    code = (
        "import sys, troth.caas.client, troth.caas.delivery\n"
        "loaded = ('fastapi', 'uvicorn', 'troth.edge', 'troth.engine', 'troth.node')\n"
        "print([m for m in loaded if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import troth.caas

    assert troth.caas.CaaS.__name__ == "CaaS"  # still there for configurations
    with pytest.raises(AttributeError):
        _ = troth.caas.Nothing
