"""Shared by the commitment examples: the node's URL and a local receiver.

Each example talks to a running node (``TROTH_URL``, default http://127.0.0.1:8700,
e.g. ``troth serve --config ca.json.example``; ``TROTH_TOKEN`` when it has API keys)
through :mod:`troth.caas.client`, and runs its own webhook receiver on 127.0.0.1, so
it shows the whole loop: promise, trigger, signed delivery. The receiver checks each
delivery's signature with the principal's secret (:func:`troth.caas.delivery.receive`;
``secrets``: those it accepts, e.g. two while the secret is rotated) and answers 401
to one that does not check out.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from troth.caas.client import Commitments
from troth.caas.delivery import InvalidSignature, receive
from troth.caas.models import Delivery


def api() -> Commitments:
    url = os.environ.get("TROTH_URL", "http://127.0.0.1:8700")
    return Commitments(url, token=os.environ.get("TROTH_TOKEN"))


class Receiver:
    """Records deliveries whose signature checks out, once each (de-duplicated by the
    commitment id, their Idempotency-Key, as a receiver should)."""

    def __init__(self, on_delivery: Callable[[Delivery], None] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        with api() as client:
            self.secrets = [client.secret()]
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                try:
                    delivery = receive(receiver.secrets, dict(self.headers), body)
                except InvalidSignature:
                    self.send_response(401)
                    self.end_headers()
                    return
                with receiver.lock:
                    fresh = delivery.commitment_id not in receiver.seen
                    receiver.seen.add(delivery.commitment_id)
                    if fresh:
                        receiver.deliveries.append(delivery)
                self.send_response(200)
                self.end_headers()
                if fresh and on_delivery:
                    on_delivery(delivery)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 30) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"expected {n} deliveries, got {len(self.deliveries)}")
            time.sleep(0.05)
        return list(self.deliveries)

    def close(self) -> None:
        self.server.shutdown()
