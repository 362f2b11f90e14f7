"""Run the versioning example end to end: python examples/versioning/demo.py

Starts an embedded Redis in a temporary directory (or uses TROTH_REDIS_URL), writes
a profile with the 1.0.0 class, then "redeploys" 1.1.0 (loads transparently),
2.0.0 (migrated by ``upgrade``) and a 2.0.0 without ``upgrade`` (refused, with the
checkpoint left intact).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from troth.core.config import parse_config
from troth.core.errors import ActivationError
from troth.core.names import ActorName
from troth.edge import embedded_redis
from troth.node import Node

ROOT = Path(__file__).resolve().parents[2]
NAME = ActorName.parse("profile/alice-p")


def deploy(url: str, cls: str) -> Node:
    config = parse_config(
        {
            "redis": {"key_prefix": "versioning-demo"},
            "python_path": [str(ROOT)],
            "types": {"profile": {"class": f"examples.versioning.profiles:{cls}"}},
            "plugins": {},
        }
    )
    node = Node(config, url, node_id="demo")
    node.start()
    return node


def main() -> int:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        url = os.environ.get("TROTH_REDIS_URL") or embedded_redis.ensure_running(tmp)
        try:
            node = deploy(url, "ProfileV1")
            node.call(NAME, "set_name", ["Ada Lovelace"]).result(10)
            print("1.0.0 wrote:", node.call(NAME, "get").result(10))
            node.stop()

            node = deploy(url, "ProfileV1_1")
            node.call(NAME, "set_email", ["ada@example.org"]).result(10)
            print("1.1.0 loaded transparently:", node.call(NAME, "get").result(10))
            node.stop()

            node = deploy(url, "ProfileV2NoUpgrade")
            try:
                node.call(NAME, "get").result(10)
            except ActivationError as exc:
                print("2.0.0 without upgrade refused:", exc)
            node.stop()

            node = deploy(url, "ProfileV2")
            print("2.0.0 migrated by upgrade():", node.call(NAME, "get").result(10))
            node.client.delete(*node.client.keys("versioning-demo:*"))
            node.stop()
        finally:
            if not os.environ.get("TROTH_REDIS_URL"):
                embedded_redis.stop(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
