"""The Lua scripts troth runs in Redis, read from the package that ships them.

Every atomic multi-key step (a commit, a lease claim or release, an outbox update)
is one script, so that it is atomic on a single Redis and, its keys sharing one hash
tag, on Redis Cluster. The scripts are plain files (``lua/*.lua``) next to the
code that runs them, never loaded from Redis or the network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from troth.core.redis_clients import SyncClient

__all__ = ["Script", "load_lua"]


def load_lua(name: str, package: str = "troth.core") -> str:
    """The text of ``lua/NAME`` inside ``package``."""
    return resources.files(package).joinpath("lua", name).read_text()


class Script:
    """A Lua script called by digest (``EVALSHA``), loaded on demand: after a
    ``NOSCRIPT`` (a restarted, flushed or newly promoted Redis) it is loaded and
    only the calls that hit it run again; a ``NOSCRIPT`` reply means the script did
    not run, so running it again is safe."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def queue(self, commands: list[tuple[Any, ...]], keys: Sequence[str], args: list[Any]) -> None:
        """Append the call to a batch of commands (:class:`~troth.core.batcher.Batcher`)."""
        commands.append(("EVALSHA", self.sha, len(keys), *keys, *args))

    def run_many(
        self, client: SyncClient, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """Run the script once per ``(keys, args)`` in one pipeline (split by master on
        Redis Cluster, where each call's keys share one slot) and return the results in
        order. Any error reply other than ``NOSCRIPT`` is raised."""
        results: list[Any] = [NoScriptError()] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            if attempt:
                client.script_load(self.source)  # on every master of a cluster
            pipe = client.pipeline(transaction=False)
            for i in todo:
                keys, args = calls[i]
                pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
            for i, result in zip(todo, pipe.execute(raise_on_error=False), strict=True):
                results[i] = result
            todo = [i for i in todo if isinstance(results[i], NoScriptError)]
            if not todo:
                break
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results
