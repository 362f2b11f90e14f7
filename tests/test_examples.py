"""Every example runs as the README says."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from conftest import REPO, call, wait_until


def test_helloworld_counter(api: httpx.Client) -> None:
    assert call(api, "counter/alice-c1", "increment", 2).json() == {"result": 2}
    assert call(api, "counter/alice-c1", "increment").json() == {"result": 3}
    assert call(api, "counter/alice-c1", "get").json() == {"result": 3}


def test_autonomous_heartbeat_pulses_by_itself(api: httpx.Client) -> None:
    call(api, "heartbeat/alice-h", "wake")
    first = call(api, "heartbeat/alice-h", "status").json()["result"]["pulses"]
    wait_until(
        lambda: call(api, "heartbeat/alice-h", "status").json()["result"]["pulses"] >= first + 3,
        timeout=5,
    )


def test_versioning_demo(redis_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "examples/versioning/demo.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TROTH_REDIS_URL": redis_url},
    )
    assert out.returncode == 0, out.stderr
    assert "1.1.0 loaded transparently" in out.stdout
    assert "2.0.0 without upgrade refused" in out.stdout
    assert "'first': 'Ada', 'last': 'Lovelace'" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    ["saga.py", "escalation.py", "deadmans_switch.py", "fanout.py", "rotation.py", "snooze.py"],
)
def test_commitment_pattern_examples(api: httpx.Client, script: str) -> None:
    out = subprocess.run(
        [sys.executable, script],
        cwd=REPO / "examples" / "commitments",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TROTH_URL": str(api.base_url).rstrip("/")},
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_crashy_slow_increment_keeps_assertion_1_under_concurrent_callers(
    api: httpx.Client,
) -> None:
    """caf.js crashy's Assertion 1: a method that awaits inside the message is never
    interleaved with another message of the same actor."""
    from concurrent.futures import ThreadPoolExecutor

    call(api, "crashy/alice-slow", "increment", 1)

    def slow() -> httpx.Response:
        with httpx.Client(base_url=api.base_url, timeout=30) as http:
            return call(http, "crashy/alice-slow", "slow_increment", 1, 0.3)

    with ThreadPoolExecutor(4) as pool:
        replies = [f.result() for f in [pool.submit(slow) for _ in range(4)]]
    assert sorted(r.json()["result"] for r in replies) == [2, 3, 4, 5]
    assert call(api, "crashy/alice-slow", "get").json()["result"]["count"] == 5
