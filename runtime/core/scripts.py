"""The Lua scripts troth runs in Redis, read from the package that ships them.

Every atomic multi-key step (a commit, a lease claim or release, an outbox update)
is one script, so that it is atomic on a single Redis and, its keys sharing one hash
tag, on Redis Cluster. The scripts are plain files (``lua/*.lua``) next to the
code that runs them, never loaded from Redis or the network.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["load_lua"]


def load_lua(name: str, package: str = "troth.core") -> str:
    """The text of ``lua/NAME`` inside ``package``."""
    return resources.files(package).joinpath("lua", name).read_text()
