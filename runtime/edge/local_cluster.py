"""A Redis Cluster on this machine, from the server binary: for tests, benchmarks and
trying troth's cluster mode without a deployment.

``LocalCluster(masters=3, replicas=1)`` starts ``masters * (1 + replicas)``
``redis-server`` (or ``valkey-server``) processes on consecutive loopback ports,
assigns the 16,384 slots evenly to the masters, makes each replica follow its
master and waits until every node agrees the cluster is up: a few seconds.
Persistence is off (a test cluster is thrown away); ``kill``, ``restart``,
``failover`` and ``migrate_slot`` do what happens to a real cluster when a server
dies, comes back, hands its slots to its replica, or is resharded.

It is not a way to run production: there, use the cluster your platform manages.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import redis

from troth.edge.embedded_redis import MEMORY_SETTINGS, EmbeddedRedisError, redis_binary

SLOTS = 16384


@dataclass
class _Server:
    port: int
    process: subprocess.Popen[bytes]
    node_id: str = ""
    master_port: int | None = None  # for a replica

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, socket_timeout=timeout)


@dataclass
class LocalCluster:
    """A Redis Cluster of ``masters`` masters, each with ``replicas`` replicas, on
    loopback ports from ``base_port`` (a free run of ports when 0)."""

    masters: int = 3
    replicas: int = 0
    base_port: int = 0
    binary: str = ""
    node_timeout_ms: int = 2000
    servers: list[_Server] = field(default_factory=list)
    _dir: tempfile.TemporaryDirectory[str] | None = None
    _binary: str = ""

    @property
    def url(self) -> str:
        """The cluster URL troth takes: one seed node; the rest is discovered."""
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}"

    def start(self, timeout: float = 30.0) -> LocalCluster:
        count = self.masters * (1 + self.replicas)
        if self.masters < 1 or self.replicas < 0:
            raise ValueError("a cluster needs at least one master and no negative replicas")
        self._binary = binary = self.binary or redis_binary()
        base = self.base_port or _free_port_run(count)
        self._dir = tempfile.TemporaryDirectory(prefix="troth-cluster-")
        try:
            for port in range(base, base + count):
                self.servers.append(_Server(port, self._spawn(binary, port)))
            self._form(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, binary: str, port: int) -> subprocess.Popen[bytes]:
        assert self._dir is not None
        cmd = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--dir",
            self._dir.name,
            "--save",
            "",
            "--appendonly",
            "no",
            *MEMORY_SETTINGS,
        ]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _form(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for server in self.servers:
            _until(partial(_pings, server), deadline, f"redis-server on port {server.port}")
            with server.client() as c:
                raw = c.execute_command("CLUSTER", "MYID")
                server.node_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        masters = self.servers[: self.masters]
        for i, server in enumerate(masters):
            lo, hi = SLOTS * i // self.masters, SLOTS * (i + 1) // self.masters
            with server.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi))
        with self.servers[0].client() as c:
            for server in self.servers[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", server.port)
        _until(self._all_known, deadline, "the cluster's nodes to meet")
        for i, server in enumerate(self.servers[self.masters :]):
            master = masters[i % self.masters]
            server.master_port = master.port
            with server.client() as c:
                c.execute_command("CLUSTER", "REPLICATE", master.node_id)
        _until(self.is_ok, deadline, "the cluster to be ok on every node")

    def _all_known(self) -> bool:
        for server in self.servers:
            with server.client() as c:
                if len(_nodes(c)) < len(self.servers):
                    return False
        return True

    def is_ok(self) -> bool:
        """Every live node says the cluster is ok, and every live replica is in sync."""
        for server in self.servers:
            if server.process.poll() is not None:
                continue
            try:
                with server.client(2.0) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    if isinstance(info, bytes):
                        info = info.decode()
                    if "cluster_state:ok" not in info:
                        return False
                    repl = c.info("replication")
                    if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                        return False
            except redis.RedisError:
                return False
        return True

    def master_ports(self) -> list[int]:
        """The ports of the nodes that are masters now (a failover changes them)."""
        out = []
        for server in self.servers:
            if server.process.poll() is not None:
                continue
            with server.client() as c:
                if c.info("replication").get("role") == "master":
                    out.append(server.port)
        return out

    def server(self, port: int) -> _Server:
        return next(s for s in self.servers if s.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL one node's process (a crash, not a shutdown)."""
        server = self.server(port)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)

    def migrate_slot(self, slot: int, to_port: int, pause: float = 0.0) -> int:
        """Move ``slot`` to the master on ``to_port`` as ``redis-cli --cluster
        reshard`` does: mark it importing and migrating, ``MIGRATE`` its keys one at a
        time (``pause`` seconds apart, so clients meet the slot half moved and get
        ``ASK`` and ``TRYAGAIN``), then give it to the target. Returns the keys moved."""
        target = self.server(to_port)
        with target.client() as c:
            owner = next((p for lo, hi, p in _slot_ranges(c) if lo <= slot <= hi), None)
        if owner is None or owner == to_port:
            raise EmbeddedRedisError(f"slot {slot} is not on another master than {to_port}")
        source = self.server(owner)
        with target.client() as t, source.client() as src:
            t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            moved = 0
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
                src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause)
            for server in self.servers:
                if server.process.poll() is None:
                    with server.client() as c:
                        role = c.info("replication").get("role")
                        if role == "master":
                            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        return moved

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """Start a killed node again on its port: it rejoins from its cluster file
        (persistence is off, so it has no data) and, if a replica took its slots
        meanwhile, follows that replica as its own replica."""
        server = self.server(port)
        if server.process.poll() is None:
            raise EmbeddedRedisError(f"the node on port {port} is running")
        server.process = self._spawn(self._binary, port)
        deadline = time.monotonic() + timeout
        _until(partial(_pings, server), deadline, f"redis-server on port {port}")
        for other in self.servers:
            if other.master_port == port and other is not server:
                server.master_port, other.master_port = other.port, None
        _until(self.is_ok, deadline, "the cluster to be ok after the restart")

    def failover(self, replica_port: int, timeout: float = 30.0) -> None:
        """A planned failover: the replica on ``replica_port`` takes over its master's
        slots after catching up with it (``CLUSTER FAILOVER``: no acknowledged write is
        lost); its old master becomes its replica."""
        replica = self.server(replica_port)
        with replica.client() as c:
            c.execute_command("CLUSTER", "FAILOVER")
        deadline = time.monotonic() + timeout

        def promoted() -> bool:
            with replica.client() as c:
                return bool(c.info("replication").get("role") == "master")

        _until(promoted, deadline, f"the replica on port {replica_port} to take over")
        old = replica.master_port
        replica.master_port = None
        if old is not None:
            self.server(old).master_port = replica_port
        _until(self.is_ok, deadline, "the cluster to be ok after the failover")

    def stop(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGKILL)
                server.process.wait(timeout=10)
        self.servers.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> LocalCluster:
        return self.start() if not self.servers else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _slot_ranges(c: redis.Redis) -> list[tuple[int, int, int]]:
    """(first slot, last slot, master port) of every range, as ``c`` sees them."""
    return [(int(r[0]), int(r[1]), int(r[2][1])) for r in c.execute_command("CLUSTER", "SLOTS")]


def _nodes(c: redis.Redis) -> list[str]:
    raw = c.execute_command("CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return [line for line in text.splitlines() if line.strip()]


def _pings(server: _Server) -> bool:
    if server.process.poll() is not None:
        raise EmbeddedRedisError(
            f"redis-server on port {server.port} exited with {server.process.returncode} "
            "(is the port taken, or the binary built without cluster support?)"
        )
    try:
        with server.client(1.0) as c:
            return bool(c.ping())
    except redis.RedisError:
        return False


def _until(predicate: Callable[[], bool], deadline: float, what: str) -> None:
    while not predicate():
        if time.monotonic() > deadline:
            raise EmbeddedRedisError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports whose cluster bus ports
    (port + 10000) are free too. Both runs are drawn below the usual ephemeral range
    (32768 up), where the connections of a busy machine leave no port in TIME_WAIT;
    probing with SO_REUSEADDR matches how redis-server binds."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(12000, 22000 - count)
        socks = []
        try:
            for port in [*range(base, base + count), *range(base + 10000, base + 10000 + count)]:
                sk = socket.socket()
                socks.append(sk)
                sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sk.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise EmbeddedRedisError("no run of free loopback ports for a cluster")


if __name__ == "__main__":  # pragma: no cover - a manual tool
    import argparse

    parser = argparse.ArgumentParser(description="Run a local Redis Cluster until Ctrl-C.")
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--port", type=int, default=7000)
    a = parser.parse_args()
    with LocalCluster(a.masters, a.replicas, a.port) as cluster:
        print(cluster.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
