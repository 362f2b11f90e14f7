"""Redis trouble is answered honestly: 503 with Retry-After within a bound, never a 500
or a hang, and nothing acknowledged is lost or doubled when Redis is killed (-9) or
paused under load."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from conftest import NodeProcess, free_port, pings, wait_until
from troth.client import Client
from troth.edge.embedded_redis import redis_binary

#: Redis's own reply bound in this test, and what a caller may wait at most for any answer.
REDIS_TIMEOUT = 1.0
ANSWER_BOUND = 8.0


class DurableRedis:
    """A redis-server that fsyncs every write, so a kill -9 loses nothing acknowledged."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: pings(client), timeout=10)
        client.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path / "redis")
    server.data.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_redis_killed_and_paused_under_load(
    durable: DurableRedis, spawn: Callable[..., NodeProcess]
) -> None:
    node = spawn(
        "p1",
        redis={"timeout_seconds": REDIS_TIMEOUT},
        node={"call_timeout_seconds": 5},
    )
    node.redis_url = durable.url
    node.start()
    acked: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    slowest = [0.0]
    lock = threading.Lock()
    stop = threading.Event()

    def drive(worker: int) -> None:
        with httpx.Client(base_url=node.url, timeout=ANSWER_BOUND * 2) as http:
            i = 0
            while not stop.is_set():
                counter = f"counter/w{worker}-{i % 5}"
                i += 1
                rid = uuid.uuid4().hex
                while True:  # one logical increment, retried under its request id
                    started = time.monotonic()
                    resp = http.post(f"/v1/actors/{counter}/increment", json={"request_id": rid})
                    with lock:
                        statuses[resp.status_code] += 1
                        slowest[0] = max(slowest[0], time.monotonic() - started)
                    if resp.status_code == 200:
                        with lock:
                            acked[counter] += 1
                        break
                    assert resp.headers.get("retry-after"), resp.text
                    assert resp.json()["error"]["type"], resp.text
                    time.sleep(0.2)

    library_errors: list[BaseException] = []

    def drive_library() -> None:
        """The client library retries 503s itself, under the same request id."""
        with Client([node.url], timeout=30) as client:
            i = 0
            while not stop.is_set():
                counter = f"counter/lib-{i % 5}"
                i += 1
                try:
                    client.call(counter, "increment")
                except BaseException as exc:
                    library_errors.append(exc)
                    return
                with lock:
                    acked[counter] += 1

    workers = [threading.Thread(target=drive, args=(w,), daemon=True) for w in range(3)]
    workers.append(threading.Thread(target=drive_library, daemon=True))
    for t in workers:
        t.start()

    def served() -> int:
        with lock:
            return sum(acked.values())

    def refused() -> int:
        with lock:
            return statuses[503]

    wait_until(lambda: served() >= 20, timeout=30)
    durable.signal(signal.SIGKILL)
    wait_until(lambda: refused() > 0, timeout=30)
    health = httpx.get(f"{node.url}/health", timeout=ANSWER_BOUND)
    assert health.status_code == 503
    durable.start()
    before = served()
    wait_until(lambda: served() >= before + 20, timeout=30)
    durable.signal(signal.SIGSTOP)
    started = time.monotonic()
    health = httpx.get(f"{node.url}/health", timeout=ANSWER_BOUND)
    assert health.status_code == 503 and time.monotonic() - started < 3.5
    time.sleep(3)  # paused longer than redis.timeout_seconds
    durable.signal(signal.SIGCONT)
    before = served()
    wait_until(lambda: served() >= before + 20, timeout=30)
    stop.set()
    for t in workers:
        t.join(60)
        assert not t.is_alive()
    assert library_errors == []
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0 and statuses[200] > 20, statuses
    assert slowest[0] < ANSWER_BOUND, slowest
    with httpx.Client(base_url=node.url, timeout=10) as http:
        for counter, n in acked.items():
            assert http.post(f"/v1/actors/{counter}/get", json={}).json() == {"result": n}
