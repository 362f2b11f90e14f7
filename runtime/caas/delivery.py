"""What a commitment's delivery looks like on the wire (Standard Webhooks).

Body (JSON)::

    {"commitment_id", "payload", "trigger", "due_at", "fired_at",
     "lateness_seconds", "attempt"}

Headers: ``webhook-id`` (the commitment id, the same on every attempt),
``webhook-timestamp`` (Unix seconds of this attempt), ``webhook-signature``
(``v1,`` + base64 HMAC-SHA256 of ``"{id}.{timestamp}.{body}"`` keyed by the
principal's secret), and ``Idempotency-Key`` (the commitment id). A receiver
verifies with :func:`verify` (or any Standard Webhooks library) and de-duplicates on
the idempotency key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import orjson

SECRET_PREFIX = "whsec_"
TOLERANCE_SECONDS = 300


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return raw.encode()


@functools.lru_cache(maxsize=1024)
def _keyed(secret: str) -> hmac.HMAC:
    """An HMAC keyed with ``secret`` and fed nothing yet, copied for each signature:
    keying it (and fetching SHA-256 from OpenSSL 3) costs more than the hash."""
    return hmac.new(_key(secret), digestmod=hashlib.sha256)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = _keyed(secret).copy()
    mac.update(b"%s.%d.%s" % (msg_id.encode(), timestamp, body))
    return "v1," + binascii.b2a_base64(mac.digest(), newline=False).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """Check a delivery's signature and timestamp (headers with lowercase names)."""
    try:
        ts = int(headers["webhook-timestamp"])
        msg_id = headers["webhook-id"]
        given = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - ts) > TOLERANCE_SECONDS:
        return False
    expected = sign(secret, msg_id, ts, body)
    return any(hmac.compare_digest(expected, g) for g in given)


@functools.lru_cache(maxsize=4096)
def iso(ms: int | None) -> str | None:
    """``ms`` as ISO 8601 UTC; None for None or a time no calendar can show (the API
    refuses such times at creation, so this only guards stored data). Cached: a
    commitment's JSON shows the same few instants several times, and a batch's
    commitments share them (formatting one costs about 3 us, a cached one 0.1 us)."""
    if ms is None:
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


def build(
    commitment_id: str, spec: dict[str, Any], attempt: int, secret: str
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one attempt of a delivery (``spec`` as
    ``Commitments.deliver`` stores it, with ``fired_ms`` set)."""
    due, fired = spec.get("due_ms"), spec["fired_ms"]
    body = orjson.dumps(
        {
            "commitment_id": commitment_id,
            "payload": spec.get("payload"),
            "trigger": spec.get("trigger"),
            "due_at": iso(due),
            "fired_at": iso(fired),
            "lateness_seconds": round(max(0, fired - (due or fired)) / 1000, 3),
            "attempt": attempt,
        }
    )
    ts = int(time.time())
    headers = {
        **spec.get("headers", {}),
        "content-type": "application/json",
        "webhook-id": commitment_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, commitment_id, ts, body),
        "idempotency-key": commitment_id,
    }
    return body, headers
