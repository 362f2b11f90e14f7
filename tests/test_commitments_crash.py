"""2,000 commitments due together, the node killed with SIGKILL while they fire."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from conftest import NodeProcess, Receiver, on_cluster_too, wait_until

N = 2000
#: Attempts in flight at once (runtime.outbox_workers): only those may be repeated.
IN_FLIGHT = 64


@pytest.mark.slow
@on_cluster_too
def test_every_commitment_delivered_through_a_kill9(
    spawn: Callable[..., NodeProcess], receiver: Receiver
) -> None:
    node = spawn("p1", runtime={"max_mailbox": 100000, "outbox_workers": IN_FLIGHT}).start()
    due = time.time() + 8
    spec = {
        "trigger": {"type": "time_after", "timestamp": due},
        "obligation": {"target": receiver.url + "/due", "payload": {"n": 1}},
    }
    ids: list[str] = []
    with httpx.Client(base_url=node.url, timeout=60) as api:
        for _ in range(N // 100):
            resp = api.post("/v1/commitments/batch", json={"commitments": [spec] * 100})
            assert resp.status_code == 201, resp.text
            ids += [c["id"] for c in resp.json()["commitments"]]
    assert len(set(ids)) == N
    wait_until(lambda: receiver.count() >= 200, timeout=30)
    node.kill()  # mid-firing: some delivered, some attempting, most not yet fired
    at_kill = receiver.count()
    node.start()
    wait_until(
        lambda: len({r.headers["idempotency-key"] for r in receiver.requests}) >= N, timeout=120
    )
    keys = {r.headers["idempotency-key"] for r in receiver.requests}
    assert keys == set(ids)
    assert at_kill < N, "the kill came after every delivery: the test proved nothing"
    # A repeat carries its commitment's one key, and only attempts in flight at the
    # kill (sent, or answered but not yet recorded) were repeated.
    assert all(r.body["commitment_id"] == r.headers["idempotency-key"] for r in receiver.requests)
    assert len(receiver.requests) - N <= IN_FLIGHT

    def fulfilled() -> int:
        total, cursor = 0, None
        with httpx.Client(base_url=node.url, timeout=30) as api:
            while True:
                params: dict[str, str | int] = {"status": "fulfilled", "limit": 500}
                page = api.get(
                    "/v1/commitments", params={**params, **({"cursor": cursor} if cursor else {})}
                ).json()
                total += len(page["items"])
                cursor = page["next_cursor"]
                if not cursor:
                    return total

    wait_until(lambda: fulfilled() == N, timeout=60)
