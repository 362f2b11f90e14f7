"""troth.testing: actors tested with a clock that moves on command, crashes on demand.

These tests are also the kit's reference: what an actor's author can rely on when
advancing time (due order, retries, pulses) and when simulating a crash.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import Receiver
from examples.autonomous.heartbeat import Heartbeat
from examples.reminders.reminder import Reminder
from support_actors import Probe
from troth.core.clock import ManualClock
from troth.core.errors import AppError
from troth.testing import ActorTestEnv

DAY = 86_400


@pytest.fixture
def env(redis_url: str) -> Iterator[ActorTestEnv]:
    with ActorTestEnv(
        {"reminder": Reminder, "heartbeat": Heartbeat},
        config={"types": {"heartbeat": {"pulse_seconds": 60}}},
        redis_url=redis_url,
    ) as env:
        yield env


def test_advance_fires_a_day_old_timer_at_once(env: ActorTestEnv, receiver: Receiver) -> None:
    rid = env.call("reminder/r", "remind_in", DAY, "renew", f"{receiver.url}/hook")
    assert [t.name for t in env.timers("reminder/r")] == [rid]
    started, t0 = time.monotonic(), env.clock.now_ms()
    env.advance(DAY - 1)
    assert receiver.requests == []
    env.advance(1)
    assert time.monotonic() - started < 10  # a day of waiting, without the waiting
    [request] = receiver.requests
    assert request.body == {"reminder": rid, "text": "renew"}
    assert request.headers["idempotency-key"] == f"reminder/r:{rid}"
    status = env.call("reminder/r", "status")
    assert status["pending"] == []
    assert status["sent"] == [{"id": rid, "at_ms": t0 + DAY * 1000}]
    assert env.timers("reminder/r") == [] and env.effects("reminder/r") == []


def test_timers_fire_in_due_order(env: ActorTestEnv, receiver: Receiver) -> None:
    for seconds, text in [(300, "third"), (100, "first"), (200, "second")]:
        env.call("reminder/o", "remind_in", seconds, text, f"{receiver.url}/hook")
    env.advance(1000)
    assert [r.body["text"] for r in receiver.requests] == ["first", "second", "third"]


def test_retries_follow_the_backoff_schedule(env: ActorTestEnv, receiver: Receiver) -> None:
    receiver.script = [503, 503]
    env.call("reminder/b", "remind_in", 0, "retry me", f"{receiver.url}/hook")
    env.settle()
    assert len(receiver.requests) == 1
    [effect] = env.effects("reminder/b")
    assert (effect.status, effect.attempts) == ("pending", 1)
    env.advance(59)
    assert len(receiver.requests) == 1  # the second attempt is due 60 s after the first
    env.advance(1)
    assert len(receiver.requests) == 2
    env.advance(299)  # exponential: the third is 300 s after the second
    assert len(receiver.requests) == 2
    env.advance(1)
    assert len(receiver.requests) == 3
    assert env.call("reminder/b", "status")["pending"] == []


def test_a_cancelled_timer_never_fires(env: ActorTestEnv, receiver: Receiver) -> None:
    rid = env.call("reminder/c", "remind_in", 60, "no", f"{receiver.url}/hook")
    assert env.call("reminder/c", "cancel", rid) is True
    env.advance(3600)
    assert receiver.requests == [] and env.timers("reminder/c") == []


def test_pulses_follow_the_clock(env: ActorTestEnv) -> None:
    env.call("heartbeat/h", "wake")
    env.advance(600)
    status = env.call("heartbeat/h", "status")
    assert status["pulses"] == 10
    assert status["last_pulse_ms"] == env.clock.now_ms()


def test_crash_keeps_what_was_committed(env: ActorTestEnv, receiver: Receiver) -> None:
    rid = env.call("reminder/k", "remind_in", 3600, "after the crash", f"{receiver.url}/hook")

    def committed() -> dict[str, Any]:
        found = env.checkpoint("reminder/k")
        assert found is not None
        return {k: v for k, v in found.items() if k != "epoch"}  # the new owner's epoch

    before = committed()
    env.crash()
    assert committed() == before
    env.advance(3600)
    assert [r.body["reminder"] for r in receiver.requests] == [rid]
    assert env.call("reminder/k", "status")["sent"][0]["id"] == rid


def test_app_errors_roll_back(env: ActorTestEnv) -> None:
    with pytest.raises(AppError):
        env.call("reminder/e", "remind_in", -1, "never", "http://127.0.0.1:9/")
    assert env.state("reminder/e") is None  # the failed first message left nothing


def test_manual_clock_only_moves_forward() -> None:
    clock = ManualClock(1_000)
    clock.advance(1.5)
    assert clock.now_ms() == 2_500
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_env_starts_its_own_redis() -> None:
    with ActorTestEnv({"reminder": Reminder}) as env:
        assert env.redis_url.startswith("unix://")
        env.call("reminder/x", "remind_in", 5, "t", "http://127.0.0.1:9/")
        assert [t.method for t in env.timers("reminder/x")] == ["due"]


def test_exhausted_retries_end_as_a_dead_letter(redis_url: str, receiver: Receiver) -> None:
    with ActorTestEnv({"probe": Probe}, redis_url=redis_url) as env:
        receiver.script = [500, 500, 500]
        retry = {"max_attempts": 3, "initial_delay_seconds": 10}
        env.call("probe/d", "nohook", f"{receiver.url}/x", {"n": 1}, retry=retry)
        env.advance(59)
        assert len(receiver.requests) == 2  # at 0 s and 10 s; the third is due at 60 s
        env.advance(1)
        assert len(receiver.requests) == 3
        [dead] = env.effects("probe/d")
        assert (dead.status, dead.attempts) == ("dead", 3)
        assert [h["status_code"] for h in dead.history] == [500, 500, 500]
        env.advance(DAY)
        assert len(receiver.requests) == 3
