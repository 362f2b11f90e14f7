"""Helpers shared by the benchmarks: a private redis-server, JSON output, and a load
of many calls in flight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import redis

import troth.engine.engine  # noqa: F401  (the hot path: compiled or not, see machine())
from troth.core import compiled
from troth.edge.embedded_redis import MEMORY_SETTINGS, redis_binary


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on loopback (AOF off: we measure troth, not the disk)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                data,
                "--save",
                "",
                "--appendonly",
                "no",
                *MEMORY_SETTINGS,  # as troth serve's embedded Redis
            ],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        try:
            yield url
        finally:
            client.close()
            proc.terminate()
            proc.wait(10)


async def windowed(total: int, make: Callable[[int], Awaitable[Any]], window: int) -> float:
    """Run ``make(i)`` for every i < ``total``, at most ``window`` at once, each in a
    task of its own; the seconds it took. The first failure is raised (after the
    others ended).

    Only the tasks still running are kept (the loop holds tasks weakly). Holding every
    task until a ``gather`` at the end (20,000 of them, and their results) made the
    process's live young objects grow by thousands a second, and the cyclic
    collector, which walks every live young object, then took 12-14% of an in-process
    node's time at 10,000 actors (1-2% without). That was the benchmark's cost, not
    troth's: a server keeps nothing of a call it answered, and the raw baseline kept
    nothing either."""
    sem = asyncio.Semaphore(window)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = total
    errors: list[BaseException] = []
    running: set[asyncio.Future[Any]] = set()

    def finished(task: asyncio.Future[Any]) -> None:
        nonlocal left
        running.discard(task)
        sem.release()
        error = None if task.cancelled() else task.exception()
        if error is not None:
            errors.append(error)
        left -= 1
        if left == 0:
            done.set_result(None)

    if total == 0:
        return 0.0
    started = time.perf_counter()
    for i in range(total):
        await sem.acquire()
        task = asyncio.ensure_future(make(i))
        running.add(task)
        task.add_done_callback(finished)
    await done
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # troth's modules that run compiled here (none: installed with TROTH_PURE_PYTHON)
        "compiled": compiled.compiled(),
    }


def harness_env() -> dict[str, str]:
    """What the harnesses of ``../shared/peers`` read: this source tree, and the
    environment where troth (its ``troth`` command, ``redis-server``) is installed:
    ``$TROTH_VENV``, else this interpreter's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = os.environ.get("TROTH_VENV", sys.prefix)
    return {**os.environ, "TROTH_SRC": root, "TROTH_VENV": venv}


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2))


def rss_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes ``pids`` have used so far (Linux)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_node(config: str, redis_url: str, node_id: str) -> tuple[subprocess.Popen[bytes], str]:
    """A `troth serve` subprocess on a free loopback port; returns once it owns shards."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "troth.edge.cli",
            "serve",
            "--config",
            config,
            "--redis",
            redis_url,
            "--port",
            str(port),
            "--node-id",
            node_id,
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).json().get("shards", 0) > 0:
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"node {node_id} did not start")


def start_nodes(
    config: str, redis_url: str, count: int, prefix: str = "n"
) -> list[tuple[subprocess.Popen[bytes], str]]:
    """``count`` nodes on one Redis; returns once every one owns its share of shards."""
    import httpx

    nodes = [start_node(config, redis_url, f"{prefix}{i + 1}") for i in range(count)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        owned = [httpx.get(f"{url}/health", timeout=5).json().get("shards", 0) for _, url in nodes]
        if max(owned) - min(owned) <= 1:
            return nodes
        time.sleep(0.25)
    for proc, _ in nodes:
        proc.kill()
    raise RuntimeError(f"{count} nodes did not share the shards within a minute: {owned}")


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if the graceful stop takes over a minute."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
