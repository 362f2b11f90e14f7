"""Shared fixtures: a real redis-server, nodes in-process and as subprocesses, and a
real HTTP receiver on 127.0.0.1. Every fixture stops what it starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from troth.core.config import parse_config
from troth.core.redis_clients import redis_client
from troth.edge.embedded_redis import redis_binary
from troth.edge.local_cluster import LocalCluster
from troth.edge.server import ServerThread
from troth.node import Node

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def _listen_ports() -> Iterator[int]:
    """Ports for this test worker's servers, in turn, forever: below the kernel's
    ephemeral range, so that no outbound connection can be handed one between the
    check that it is free and the server's bind (port 0 gives an ephemeral port, which
    any test's client may take meanwhile), and a slice of its own per pytest-xdist
    worker, so that two workers never pick the same."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral = max(int(text.split()[0]), 20000)
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 10000
    size = (ephemeral - low) // max(workers, 1)
    first = low + worker * size
    last = first + size - 16  # room for a run of consecutive ports (free_port_run)
    start = first + os.getpid() % (last - first)
    while True:
        yield from range(start, last)
        yield from range(first, start)


_PORTS = _listen_ports()


def free_port() -> int:
    """A port on 127.0.0.1 that was free just now and that no outbound connection can
    take (see :func:`_listen_ports`)."""
    return free_port_run(1)


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive TCP ports on 127.0.0.1 that are all free (for
    ``troth serve --nodes N``, whose node i listens on port + i)."""
    while True:
        base = next(_PORTS)
        socks = []
        try:
            for offset in range(count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


#: The Redis the suite runs against: ``single`` (one redis-server, the default) or
#: ``cluster`` (a local Redis Cluster of 3 masters, each with a replica). The server
#: binary is ``TROTH_REDIS_SERVER`` when set (the version matrix: see the README).
TEST_REDIS = os.environ.get("TROTH_TEST_REDIS", "single")

#: Runs a test on one Redis and again on a Redis Cluster (3 masters, 3 replicas).
on_cluster_too = pytest.mark.parametrize("redis_url", ["single", "cluster"], indirect=True)


@pytest.fixture(scope="session")
def redis_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One real Redis for the session (per kind: see ``on_cluster_too``); tests isolate
    themselves by key prefix."""
    kind = getattr(request, "param", TEST_REDIS)
    if os.environ.get("TROTH_TEST_REDIS_URL") and kind == TEST_REDIS:
        yield os.environ["TROTH_TEST_REDIS_URL"]
        return
    if kind == "cluster":
        with LocalCluster(masters=3, replicas=1) as cluster:
            yield cluster.url
        return
    if kind != "single":
        raise pytest.UsageError(f"TROTH_TEST_REDIS must be single or cluster, not {kind!r}")
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        wait_until(lambda: pings(client), timeout=10)
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


def pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test's Redis (a cluster client on a cluster)."""
    client = redis_client(redis_url)
    yield client
    client.close()


def base_config(prefix: str, **overrides: Any) -> dict[str, Any]:
    """A test configuration: short leases, example and test actor types, loopback webhooks."""
    cfg: dict[str, Any] = {
        "node": {"host": "127.0.0.1", "port": 0, "call_timeout_seconds": 10},
        "redis": {"key_prefix": prefix},
        "cluster": {"shards": 64, "lease_ttl_seconds": 2, "heartbeat_seconds": 0.5},
        "python_path": [str(REPO), str(TESTS)],
        "types": {
            "counter": {"class": "examples.helloworld.counter:Counter"},
            "crashy": {"class": "examples.crashy.crashy:Crashy"},
            "journal": {"class": "examples.crashy.crashy:Journal"},
            "heartbeat": {"class": "examples.autonomous.heartbeat:Heartbeat", "pulse_seconds": 0.2},
            "profile": {"class": "examples.versioning.profiles:ProfileV1"},
            "probe": {"class": "support_actors:Probe", "idle_seconds": 0.5},
        },
        "plugins": {
            "log": {},
            "timers": {},
            "send": {"timeout_seconds": 5},
            "http": {"allow_loopback": True, "timeout_seconds": 2},
            "session": {},
            "commitments": {"allow_loopback": True, "timeout_seconds": 2},
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_node(redis_url: str, prefix: str) -> Iterator[Callable[..., Node]]:
    """Build and start in-process nodes sharing the test's key prefix; ``serve=True``
    also serves the node's HTTP API (``node.url``) from a thread."""
    nodes: list[tuple[Node, ServerThread | None]] = []

    def make(node_id: str | None = None, serve: bool = False, **overrides: Any) -> Node:
        config = parse_config(base_config(prefix, **overrides))
        node = Node(config, redis_url, node_id)
        server = ServerThread(node) if serve else None
        node.start()
        if server is not None:
            server.start()
        nodes.append((node, server))
        return node

    yield make
    for node, server in reversed(nodes):
        if server is not None:
            server.stop()
        node.stop()


@pytest.fixture
def node(make_node: Callable[..., Node]) -> Node:
    return make_node("n1")


@pytest.fixture
def api(node: Node) -> Iterator[httpx.Client]:
    server = ServerThread(node).start()
    with httpx.Client(base_url=server.url, timeout=15) as client:
        yield client
    server.stop()


def call(api: httpx.Client, actor: str, method: str, *args: Any, **kwargs: Any) -> httpx.Response:
    rid = kwargs.pop("request_id", None)
    body: dict[str, Any] = {"args": list(args), "kwargs": kwargs}
    if rid:
        body["request_id"] = rid
    return api.post(f"/v1/actors/{actor}/{method}", json=body)


# -- subprocess nodes -------------------------------------------------------------------


@dataclass
class NodeProcess:
    """A ``troth serve`` subprocess; ``kill()`` is SIGKILL, ``stop()`` is SIGTERM."""

    config_path: Path
    redis_url: str
    node_id: str
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_shards: bool = True) -> NodeProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "troth.edge.cli",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--redis",
                    self.redis_url,
                    "--port",
                    str(self.port),
                    "--node-id",
                    self.node_id,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._healthy if not wait_shards else self._serving, timeout=30)
        return self

    def _health(self) -> dict[str, Any] | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited: {self.log_path.read_text()[-3000:]}")
        try:
            resp = httpx.get(f"{self.url}/health", timeout=1)
            return dict(resp.json()) if resp.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def _healthy(self) -> bool:
        return self._health() is not None

    def _serving(self) -> bool:
        h = self._health()
        return bool(h and h["shards"] > 0)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def spawn(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[Callable[..., NodeProcess]]:
    procs: list[NodeProcess] = []

    def make(node_id: str = "p1", **overrides: Any) -> NodeProcess:
        path = tmp_path / f"{node_id}.json"
        path.write_text(json.dumps(base_config(prefix, **overrides)))
        p = NodeProcess(path, redis_url, node_id, tmp_path / f"{node_id}.log")
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


# -- a real HTTP receiver ------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes = b""


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) drops connections when a fan-out sends a few
    # hundred deliveries at once, and the senders' retries then look like duplicates.
    request_queue_size = 1024


class Receiver:
    """Records requests; answers with scripted statuses (then 200). ``hang`` blocks one."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[int | str] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length) if length else b""
                with receiver.lock:
                    receiver.requests.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            json.loads(raw) if raw else None,
                            raw,
                        )
                    )
                    action = receiver.script.pop(0) if receiver.script else 200
                if action == "hang":
                    receiver.release.wait(60)
                    return
                self.send_response(int(action))
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll interval: shutdown() waits for the loop's next poll.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()
