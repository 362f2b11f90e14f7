"""``troth commitments``: the command line (its entry point, as installed) against a
real node with API keys and a real receiver."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Receiver, free_port, wait_until
from troth.edge.cli import main
from troth.node import Node

KEY = "k" * 16


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


Troth = Callable[..., Ran]


@pytest.fixture
def troth(
    make_node: Callable[..., Node],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Troth:
    """``troth commitments ...`` reaching a keyed node through TROTH_URL and TROTH_TOKEN."""
    commitments = {"allow_loopback": True, "timeout_seconds": 2, "indexed_metadata": ["customer"]}
    node = make_node(
        "n1", serve=True, auth={"api_keys": {KEY: "p"}}, plugins={"commitments": commitments}
    )
    monkeypatch.setenv("TROTH_URL", str(node.url))
    monkeypatch.setenv("TROTH_TOKEN", KEY)

    def run(*args: str, stdin: str = "") -> Ran:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(["commitments", *args])
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run


def spec(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {
        "trigger": {"type": "webhook", "event_type": "paid", "filters": {"amount_gte": 100}},
        "obligation": {"target": f"{receiver.url}/hook", "payload": {"order": 17}},
        **extra,
    }


def test_create_list_publish_get_cancel(troth: Troth, receiver: Receiver, tmp_path: Path) -> None:
    file = tmp_path / "one.json"
    file.write_text(json.dumps(spec(receiver, dedup_key="order-17")))
    made = troth("create", str(file))
    assert made.returncode == 0, made.stderr
    cid = json.loads(made.stdout)["id"]
    again = troth("create", str(file))  # the same dedup_key: the same commitment
    assert again.returncode == 0 and json.loads(again.stdout)["id"] == cid
    batch = troth("create", "-", stdin=json.dumps([spec(receiver), spec(receiver)]))
    assert batch.returncode == 0, batch.stderr
    others = [c["id"] for c in json.loads(batch.stdout)]
    assert len(others) == 2 and cid not in others

    table = troth("list", "--status", "pending")
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 3
    assert all(line.split()[1:3] == ["pending", "webhook"] for line in table.stdout.splitlines())
    two = troth("list", "--json", "--limit", "2")
    lines = two.stdout.splitlines()
    assert {json.loads(line)["id"] for line in lines} == set(others)  # the newest two
    assert "more than 2" in two.stderr

    cancel = troth("cancel", others[0], "cm_" + "0" * 32)
    assert cancel.returncode == 1  # one of them could not be cancelled
    ok, missing = json.loads(cancel.stdout)
    assert ok == {"id": others[0], "status": "cancelled"}
    assert missing["error"]["type"] == "NotFoundError"

    sent = troth("publish", "paid", '{"amount": 150}', "--key", "pay-1")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["delivered_to"] == 2  # the cancelled one no longer waits
    repeat = json.loads(troth("publish", "paid", '{"amount": 150}', "--key", "pay-1").stdout)
    assert repeat["duplicate"] is True
    wait_until(lambda: receiver.count() == 2, timeout=10)
    done = json.loads(troth("get", cid).stdout)
    assert done["status"] in ("triggered", "fulfilled") and done["fired_by"]["kind"] == "event"
    assert troth("secret").stdout.startswith("whsec_")


def test_bad_input_is_refused_before_anything_is_sent(
    troth: Troth, receiver: Receiver, tmp_path: Path
) -> None:
    bad = spec(receiver)
    bad["trigger"] = {"type": "time_after", "delay_seconds": "soon"}
    refused = troth("create", "-", stdin=json.dumps([spec(receiver), bad]))
    assert refused.returncode == 2 and refused.stdout == ""
    assert "commitments.1.trigger.time_after.delay_seconds" in refused.stderr
    for args, says in (
        (("create", str(tmp_path / "absent.json")), "cannot read"),
        (("create", "-"), "not JSON"),
        (("publish", "paid", "{oops"), "the payload is not JSON"),
        (("get", "cm_x/../y"), "not a commitment id"),
        (("list", "--limit", "0"), "--limit"),
    ):
        got = troth(*args, stdin="")
        assert got.returncode == 2 and says in got.stderr, (args, got.stderr)
    listed = troth("list")
    assert listed.returncode == 0 and listed.stdout == ""  # nothing was created


def test_errors_are_the_nodes_own(troth: Troth, receiver: Receiver) -> None:
    missing = troth("get", "cm_" + "0" * 32)
    assert missing.returncode == 2 and "NotFoundError" in missing.stderr
    denied = troth("list", "--token", "w" * 16)
    assert denied.returncode == 2 and "AuthError" in denied.stderr
    down = troth("list", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "1")
    assert down.returncode == 2 and "CallTimeout" in down.stderr


def test_secret_and_its_rotation(troth: Troth) -> None:
    first = troth("secret")
    assert first.returncode == 0 and first.stdout.startswith("whsec_")
    rotated = troth("secret", "--rotate", "--keep-previous", "60")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new.startswith("whsec_") and new != first.stdout.strip()
    assert "every node signs with the new secret from" in rotated.stderr
    assert "the previous one signs too until" in rotated.stderr
    shown = troth("secret", "--json")
    info = json.loads(shown.stdout)
    assert info["secret"] == new and info["previous_expires_at"] and not info["configured"]
    leaked = troth("secret", "--rotate", "--keep-previous", "0")
    assert "the previous one no longer signs" in leaked.stderr
    for args in (["--keep-previous", "5"], ["--rotate", "--keep-previous", "-1"]):
        refused = troth("secret", *args)
        assert refused.returncode == 2 and "keep" in refused.stderr, refused.stderr
    assert troth("secret").stdout.strip() == leaked.stdout.strip()  # nothing more rotated


def test_list_by_dedup_key_and_metadata(troth: Troth, receiver: Receiver, tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(spec(receiver, dedup_key="order-9", metadata={"customer": "c2"})))
    made = json.loads(troth("create", str(path)).stdout)
    found = troth("list", "--dedup-key", "order-9")
    assert found.returncode == 0 and made["id"] in found.stdout
    assert troth("list", "--dedup-key", "order-10").stdout == ""
    rows = troth("list", "--meta", "customer=c2", "--json").stdout.splitlines()
    assert [json.loads(r)["id"] for r in rows] == [made["id"]]
    refused = troth("list", "--meta", "customer")
    assert refused.returncode == 2 and "KEY=VALUE" in refused.stderr
    # An indexed key (once its index is built) lists page after page, up to --limit.
    path.write_text(json.dumps([spec(receiver, metadata={"customer": "c3"})] * 3))
    batch = [c["id"] for c in json.loads(troth("create", str(path)).stdout)]
    wait_until(
        lambda: "more than 2" in troth("list", "--meta", "customer=c3", "--limit", "2").stderr
    )
    rows = troth("list", "--meta", "customer=c3", "--limit", "5", "--json").stdout.splitlines()
    assert sorted(json.loads(r)["id"] for r in rows) == sorted(batch) and len(rows) == 3


def test_reschedule(troth: Troth, receiver: Receiver, tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    later = {"type": "time_after", "delay_seconds": 3600}
    path.write_text(json.dumps({"trigger": later, "obligation": {"target": receiver.url}}))
    cid = json.loads(troth("create", str(path)).stdout)["id"]
    moved = troth("reschedule", cid, "--at", "2100-01-02T03:04:05Z")
    assert moved.returncode == 0 and json.loads(moved.stdout)["due_at"] == "2100-01-02T03:04:05Z"
    moved = troth("reschedule", cid, "--at", "4102542245")  # Unix seconds: the same time
    assert json.loads(moved.stdout)["due_at"] == "2100-01-02T03:04:05Z"
    assert troth("reschedule", cid, "--in", "0.1").returncode == 0
    wait_until(lambda: len(receiver.requests) == 1)
    for args, says in (
        (["--at", "tomorrow"], "ISO 8601"),
        (["--at", "2100-01-02T03:04:05"], "timezone"),
    ):
        refused = troth("reschedule", cid, *args)
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr
    with pytest.raises(SystemExit):  # argparse's own refusal
        troth("reschedule", cid, "--in", "1", "--at", "4102542245")
