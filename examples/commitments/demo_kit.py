"""Shared by the commitment examples: the node's URL and a local receiver.

Each example talks to a running node (``TROTH_URL``, default http://127.0.0.1:8700,
e.g. ``troth serve --config ca.json.example``; ``TROTH_TOKEN`` when it has API keys)
through :mod:`troth.caas.client`, and runs its own webhook receiver on 127.0.0.1, so
it shows the whole loop: promise, trigger, signed delivery.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from troth.caas.client import Commitments


def api() -> Commitments:
    url = os.environ.get("TROTH_URL", "http://127.0.0.1:8700")
    return Commitments(url, token=os.environ.get("TROTH_TOKEN"))


class Receiver:
    """Records deliveries (de-duplicated by Idempotency-Key, as a receiver should)."""

    def __init__(self, on_delivery: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                key = self.headers["idempotency-key"]
                with receiver.lock:
                    fresh = key not in receiver.seen
                    receiver.seen.add(key)
                    if fresh:
                        receiver.deliveries.append({"path": self.path, **body})
                self.send_response(200)
                self.end_headers()
                if fresh and on_delivery:
                    on_delivery({"path": self.path, **body})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"expected {n} deliveries, got {len(self.deliveries)}")
            time.sleep(0.05)
        return list(self.deliveries)

    def close(self) -> None:
        self.server.shutdown()
