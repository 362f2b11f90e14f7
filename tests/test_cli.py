"""The command line: serve with the embedded Redis, status, inspect, call, redis stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import redis

from conftest import REPO, NodeProcess, free_port, free_port_run, on_cluster_too, wait_until
from troth.edge import embedded_redis
from troth.edge.cli import main


def troth(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "troth.edge.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"troth {' '.join(args)} failed: {proc.stderr}")
    return proc


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "d"
    yield d
    embedded_redis.stop(d)


def serve_example(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """`troth serve --config ca.json.example` from the repository root (the README's path)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "troth.edge.cli",
            "serve",
            "--config",
            "ca.json.example",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "TROTH_REDIS_URL"},
    )


def serving(port: int) -> bool:
    try:
        h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        return h.status_code == 200 and h.json()["shards"] > 0
    except httpx.HTTPError:
        return False


def test_embedded_redis_keeps_checkpoints_compact_and_big_hashes_tables(data_dir: Path) -> None:
    """A checkpoint (6 fields, its state up to 1 KB) is one compact listpack, about half
    the memory of a hash table; a hash of more than 16 fields (a shard's outbox, one
    entry a pending delivery) is a hash table, whose writes do not slow down with its
    size (a listpack is rewritten whole by each)."""
    client = redis.Redis.from_url(embedded_redis.ensure_running(data_dir))
    try:
        fields = {"state": "s" * 1000, "pstate": "p" * 200, "version": "1.0.0", "seq": 7}
        client.hset("checkpoint", mapping={**fields, "updated": 1, "created": 1})
        client.hset("outbox", mapping={f"entry-{i}": "e" * 500 for i in range(17)})
        assert client.object("encoding", "checkpoint") in (b"listpack", b"ziplist")
        assert client.object("encoding", "outbox") == b"hashtable"
    finally:
        client.close()


@pytest.mark.slow
def test_example_config_with_embedded_redis_survives_node_kill(data_dir: Path) -> None:
    port = free_port()
    first = serve_example(data_dir, port)
    try:
        wait_until(lambda: serving(port), timeout=30)
        url = f"http://127.0.0.1:{port}/v1/actors/counter/alice-c1/increment"
        assert httpx.post(url, json={"args": [2]}).json() == {"result": 2}
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        assert embedded_redis.is_running(data_dir), "killing the node must not kill Redis"
        # AOF persistence is on: one file (Redis 6), or a directory (Redis 7+, Valkey).
        assert (data_dir / "appendonly.aof").exists() or (data_dir / "appendonlydir").is_dir()
        # A second node on the same data directory joins the same Redis.
        port2 = free_port()
        second = serve_example(data_dir, port2)
        try:
            wait_until(lambda: serving(port2), timeout=30)
            url2 = f"http://127.0.0.1:{port2}/v1/actors/counter/alice-c1/increment"
            assert httpx.post(url2, json={"args": [1]}).json() == {"result": 3}
            status = json.loads(troth("status", "--data-dir", str(data_dir), "--json").stdout)
            live = [n for n in status["nodes"] if n["live"]]
            assert len(live) == 1 and live[0]["shards"] == 1024
        finally:
            second.terminate()
            second.wait(20)
    finally:
        if first.poll() is None:
            first.kill()
    assert troth("redis", "stop", "--data-dir", str(data_dir)).stdout.strip() == "stopped"
    assert not embedded_redis.is_running(data_dir)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    """``troth ARGS`` in this process: the same code as the command, without paying
    for a Python start-up per call (one test below runs the real command)."""
    code = main(list(args))
    out = capsys.readouterr()
    return Ran(code, out.out, out.err)


@on_cluster_too
def test_status_inspect_call(
    spawn: Callable[..., NodeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    node = spawn("p1").start()
    where = ("--config", str(node.config_path), "--redis", node.redis_url)

    def ok(*args: str) -> str:
        ran = run_cli(capsys, *args)
        assert ran.returncode == 0, ran.stderr
        return ran.stdout

    # The installed entry point, as an operator runs it:
    assert json.loads(troth("call", *where, "counter/alice-c", "increment", "5").stdout) == 5
    same = ("counter/alice-c", "increment", "--kwargs", '{"by": 2}', "--request-id", "same")
    out, again = ok("call", *where, *same), ok("call", *where, *same)
    assert json.loads(out) == json.loads(again) == 7
    bad = run_cli(capsys, "call", *where, "counter/alice-c", "increment", "0")
    assert bad.returncode == 2 and "AppError" in bad.stderr

    data = json.loads(ok("inspect", *where, "counter/alice-c"))
    assert data["state"] == {"count": 7} and data["version"] == "1.0.0" and data["seq"] == 2
    assert run_cli(capsys, "inspect", *where, "counter/none").returncode == 1

    status = json.loads(ok("status", *where, "--json"))
    assert status["actors"] >= 1 and status["nodes"][0]["id"] == "p1"
    assert status["commitments"] == {}  # the CaaS extension's section
    table = ok("status", *where)
    assert "p1" in table and "SHARDS" in table

    # With no node running, `troth call` hosts the call itself.
    node.stop()
    assert json.loads(ok("call", *where, "counter/alice-c", "get")) == 7


def test_bad_config_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"node": {"port": "many"}, "typo": 1}')
    out = troth("status", "--config", str(cfg), check=False)
    assert out.returncode == 2
    assert "node.port" in out.stderr and "typo" in out.stderr


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"types": {"x": {"class": "no_such_module:X"}}}, "cannot import 'no_such_module'"),
        ({"plugins": {"http": {"timeout_seconds": -1}}}, "plugins.http.timeout_seconds"),
        ({"plugins": {"nosuch": {}}}, "plugins.nosuch: unknown plugin"),
        ({"runtime": {"cpu": 4096}}, "runtime.cpu: CPU 4096 is not one this process may run on"),
    ],
)
def test_serve_with_a_bad_config_starts_nothing(
    tmp_path: Path, config: dict[str, object], says: str
) -> None:
    """Not even the embedded Redis: the configuration is checked first."""
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(config))
    data = tmp_path / "data"
    out = troth("serve", "--config", str(cfg), "--data-dir", str(data), "--port", "0", check=False)
    started = embedded_redis.stop(str(data))  # (one that started must not outlive the test)
    assert out.returncode == 2 and says in out.stderr, out.stderr
    assert not started


@pytest.mark.slow
def test_serve_nodes_runs_and_restarts_several_node_processes(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:

    from conftest import base_config
    from troth.core.keys import KeySpace
    from troth.core.redis_clients import redis_client
    from troth.edge import admin

    config = tmp_path / "ca.json"
    config.write_text(json.dumps(base_config(prefix)))
    port = free_port_run(2)
    client = redis_client(redis_url)
    keys = KeySpace(prefix, 64)
    allowed = sorted(os.sched_getaffinity(0))
    first_cpu = allowed[-1]  # node 0 there, node 1 on the next (the first again, round)
    log = (tmp_path / "sup.log").open("wb")  # the supervisor's and its nodes' logs
    sup = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "troth.edge.cli",
            "serve",
            "--nodes",
            "2",
            "--config",
            str(config),
            "--redis",
            redis_url,
            "--port",
            str(port),
            "--node-id",
            "sup",
            "--cpu",
            str(first_cpu),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for url in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"):
            wait_until(partial(_healthy, url), timeout=30)
        shown = {n["id"]: n["cpu"] for n in admin.status(client, keys, [])["nodes"]}
        for i in range(2):  # each node's loop is pinned to its own CPU, as status shows
            cpu = allowed[(len(allowed) - 1 + i) % len(allowed)]
            node_pid = int(client.hget(keys.node(f"sup-{i}"), "pid") or 0)
            assert {cpu} in _thread_cpus(node_pid) and shown[f"sup-{i}"] == cpu
        pid = int(client.hget(keys.node("sup-1"), "pid") or 0)
        os.kill(pid, signal.SIGKILL)  # an operator kills one node: it comes back
        wait_until(
            lambda: int(client.hget(keys.node("sup-1"), "pid") or 0) not in (0, pid), timeout=30
        )
        wait_until(lambda: _healthy(f"http://127.0.0.1:{port + 1}"), timeout=30)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/actors/counter/alice-s/increment", json={})
        assert resp.json() == {"result": 1}
    except AssertionError as exc:
        raise AssertionError(f"{exc}; logs:\n{(tmp_path / 'sup.log').read_text()[-3000:]}") from exc
    finally:
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == 0
        client.close()
        log.close()
    assert not _healthy(f"http://127.0.0.1:{port}")


def _thread_cpus(pid: int) -> list[set[int]]:
    """The CPUs each thread of process ``pid`` may run on."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            found.append(os.sched_getaffinity(int(tid)))
    return found


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from troth import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"troth {__version__}"


def test_installed_packages_add_commands_and_a_broken_one_is_reported(tmp_path: Path) -> None:
    """Commands come from the entry point group ``troth.commands`` of what is installed
    (``troth commitments`` is one); one that fails to load leaves the others working."""
    dist = tmp_path / "broken_cmds-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-cmds\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[troth.commands]\nbroken = no_such_module:add\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "troth.edge.cli", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "commitments" in out.stdout and "status" in out.stdout
    assert "the commands of no_such_module:add did not load" in out.stderr


def test_an_unreachable_redis_is_one_line_not_a_traceback() -> None:
    where = f"redis://127.0.0.1:{free_port()}"
    for command in (("serve", "--port", "0"), ("status",), ("call", "counter/a-b", "get")):
        out = troth(*command, "--redis", where, check=False)
        assert out.returncode == 2, (command, out.stderr)
        assert out.stderr.startswith("troth: RedisUnavailable: ") and "Traceback" not in out.stderr
