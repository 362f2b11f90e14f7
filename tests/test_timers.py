"""Durable timers: committed with the transaction, fired exactly once, told lateness."""

from __future__ import annotations

import time

import httpx

from conftest import call, wait_until


def fired(api: httpx.Client, actor: str = "probe/alice-t") -> list[dict[str, object]]:
    return list(call(api, actor, "get").json()["result"]["fired"])


def test_after_fires_once_with_lateness(api: httpx.Client) -> None:
    call(api, "probe/alice-t", "after", 0.3, "a")
    assert "a" in call(api, "probe/alice-t", "timers").json()["result"]
    wait_until(lambda: fired(api))
    time.sleep(0.5)
    [f] = fired(api)
    assert f["name"] == "a" and 0 <= float(f["lateness"]) < 2  # type: ignore[arg-type]
    assert call(api, "probe/alice-t", "timers").json()["result"] == {}


def test_cancel_before_due(api: httpx.Client) -> None:
    call(api, "probe/alice-t", "after", 0.4, "a")
    assert call(api, "probe/alice-t", "cancel", "a").json()["result"] is True
    time.sleep(0.8)
    assert fired(api) == []


def test_rolled_back_timer_never_exists(api: httpx.Client) -> None:
    # set_and_fail is not a Probe method: use the crashy example which sets a timer
    resp = call(api, "crashy/alice-x", "increment", 1, fail="app", notify="journal/alice-j")
    assert resp.status_code == 409
    assert call(api, "crashy/alice-x", "get").json()["result"]["count"] == 0


def test_every_repeats_until_cancelled(api: httpx.Client) -> None:
    call(api, "probe/alice-t", "every", 0.2, "tick")
    wait_until(lambda: len(fired(api)) >= 3, timeout=5)
    call(api, "probe/alice-t", "cancel", "tick")
    n = len(fired(api))
    time.sleep(0.6)
    assert len(fired(api)) <= n + 1  # at most one firing was already queued


def test_failing_handler_consumes_timer_and_rolls_back(api: httpx.Client) -> None:
    call(api, "probe/alice-t", "after", 0.1, "bad", fail=True)
    wait_until(lambda: call(api, "probe/alice-t", "timers").json()["result"] == {}, timeout=5)
    time.sleep(0.3)
    assert fired(api) == []  # the handler's state change rolled back, and it did not loop
