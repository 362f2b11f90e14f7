"""Durable timers: committed with the transaction, fired exactly once, in due order,
told their lateness. Time is a :class:`~troth.core.clock.ManualClock` (troth.testing):
nothing here waits for a timer to fall due."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from support_actors import Probe
from troth.core.errors import AppError
from troth.testing import ActorTestEnv

P = "probe/alice-t"


@pytest.fixture
def env(redis_url: str) -> Iterator[ActorTestEnv]:
    with ActorTestEnv({"probe": Probe}, redis_url=redis_url) as env:
        yield env


def fired(env: ActorTestEnv) -> list[dict[str, Any]]:
    return list(env.call(P, "get")["fired"])


def test_after_fires_once_on_time(env: ActorTestEnv) -> None:
    env.call(P, "after", 30, "a")
    assert [(t.name, t.method) for t in env.timers(P)] == [("a", "on_timer")]
    env.advance(29.999)
    assert fired(env) == []
    env.advance(0.001)
    assert fired(env) == [{"name": "a", "lateness": 0.0, "missed": 0}]
    env.advance(3600)
    assert len(fired(env)) == 1
    assert env.timers(P) == [] and env.call(P, "timers") == {}


def test_cancel_before_due(env: ActorTestEnv) -> None:
    env.call(P, "after", 10, "a")
    assert env.call(P, "cancel", "a") is True
    assert env.timers(P) == []
    env.advance(60)
    assert fired(env) == []


def test_rolled_back_timer_never_exists(env: ActorTestEnv) -> None:
    env.call(P, "set", 1)
    with pytest.raises(AppError):
        env.call(P, "after_then_fail", 10, "x")
    assert env.timers(P) == [] and env.call(P, "timers") == {}
    env.advance(60)
    assert fired(env) == []


def test_every_repeats_until_cancelled(env: ActorTestEnv) -> None:
    env.call(P, "every", 10, "tick")
    env.advance(35)
    assert [f["name"] for f in fired(env)] == ["tick"] * 3
    env.call(P, "cancel", "tick")
    env.advance(100)
    assert len(fired(env)) == 3


def test_failing_handler_consumes_timer_and_rolls_back(env: ActorTestEnv) -> None:
    env.call(P, "after", 5, "bad", fail=True)
    env.advance(5)
    assert env.timers(P) == []
    env.advance(600)
    assert fired(env) == []  # the handler's state change rolled back, and it did not loop


def test_timers_fire_in_due_order(env: ActorTestEnv) -> None:
    for seconds, name in [(30, "c"), (10, "a"), (20, "b")]:
        env.call(P, "after", seconds, name)
    env.advance(60)
    assert [f["name"] for f in fired(env)] == ["a", "b", "c"]


def test_a_timer_due_while_no_node_runs_fires_late_once(env: ActorTestEnv) -> None:
    env.call(P, "after", 10, "once")
    env.call(P, "every", 10, "tick")
    env.crash(down_seconds=35)
    env.settle()
    got = {f["name"]: f for f in fired(env)}
    assert got["once"] == {"name": "once", "lateness": 25.0, "missed": 0}
    assert got["tick"]["lateness"] == 25.0 and got["tick"]["missed"] == 2
    env.advance(10)
    assert [f["name"] for f in fired(env)].count("tick") == 2
