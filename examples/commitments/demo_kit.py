"""Shared by the commitment examples: a node URL, a local receiver, a small client.

Each example talks to a running node (``TROTH_URL``, default http://127.0.0.1:8700,
e.g. ``troth serve --config ca.json.example``) and runs its own webhook receiver on
127.0.0.1, so it shows the whole loop: promise, trigger, signed delivery.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

URL = os.environ.get("TROTH_URL", "http://127.0.0.1:8700")
TOKEN = os.environ.get("TROTH_TOKEN")


def api() -> httpx.Client:
    headers = {"authorization": f"Bearer {TOKEN}"} if TOKEN else {}
    return httpx.Client(base_url=URL, headers=headers, timeout=30)


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


def create(
    client: httpx.Client, trigger: dict[str, Any], target: str, payload: Any, **extra: Any
) -> dict[str, Any]:
    resp = client.post(
        "/v1/commitments",
        json={"trigger": trigger, "obligation": {"target": target, "payload": payload}, **extra},
    )
    resp.raise_for_status()
    return dict(resp.json())


def event(client: httpx.Client, event_type: str, **payload: Any) -> None:
    client.post(
        "/v1/events", json={"event_type": event_type, "payload": payload}
    ).raise_for_status()
