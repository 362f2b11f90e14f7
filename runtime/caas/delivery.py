"""What a commitment's delivery looks like on the wire (Standard Webhooks).

Body (JSON)::

    {"commitment_id", "payload", "trigger", "due_at", "fired_at",
     "lateness_seconds", "attempt"}

``trigger`` says what fired it (:func:`public_brief`): ``kind`` (``time``, also for a
heartbeat that lapsed, or ``event``), ``path`` (which leaf of the trigger: ``r``,
``r.0``, ``r.1.2``), and ``due_at`` or the ``event`` (``event_id``, ``event_type``,
``event_key``, ``payload``, ``received_at``).

Headers: ``webhook-id`` (the commitment id, the same on every attempt),
``webhook-timestamp`` (Unix seconds of this attempt), ``webhook-signature``
(``v1,`` + base64 HMAC-SHA256 of ``"{id}.{timestamp}.{body}"`` keyed by the
principal's secret; while a secret is being rotated, one such signature per secret,
separated by spaces: see :mod:`troth.caas.signing`), and ``Idempotency-Key`` (the
commitment id). A receiver checks and reads it with :func:`receive` (or
:func:`verify` and any JSON parser, or any Standard Webhooks library) and
de-duplicates on the idempotency key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from troth.caas.models import Delivery

SECRET_PREFIX = "whsec_"
TOLERANCE_SECONDS = 300


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_`` (which may be left out)
    and the base64 of 24 to 64 bytes (padding optional), as every Standard Webhooks
    library reads it, so that any of them verifies troth's deliveries. Raises
    ValueError (without the secret's text) for anything else."""
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except ValueError:
        key = b""
    if not 24 <= len(key) <= 64:
        raise ValueError(
            "a signing secret is 'whsec_' and the base64 of 24 to 64 random bytes "
            "(Standard Webhooks)"
        )
    return key


@functools.lru_cache(maxsize=1024)
def _keyed(secret: str) -> hmac.HMAC:
    """An HMAC keyed with ``secret`` and fed nothing yet, copied for each signature:
    keying it (and fetching SHA-256 from OpenSSL 3) costs more than the hash."""
    return hmac.new(secret_key(secret), digestmod=hashlib.sha256)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = _keyed(secret).copy()
    mac.update(b"%s.%d.%s" % (msg_id.encode(), timestamp, body))
    return "v1," + binascii.b2a_base64(mac.digest(), newline=False).decode()


def verify(
    secret: str | Sequence[str],
    headers: dict[str, str],
    body: bytes,
    now: float | None = None,
) -> bool:
    """Check a delivery's signature and timestamp (headers with lowercase names).
    Several secrets (a receiver in the middle of a rotation): any one will do."""
    try:
        ts = int(headers["webhook-timestamp"])
        msg_id = headers["webhook-id"]
        given = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - ts) > TOLERANCE_SECONDS:
        return False
    for one in [secret] if isinstance(secret, str) else secret:
        expected = sign(one, msg_id, ts, body)
        if any(hmac.compare_digest(expected, g) for g in given):
            return True
    return False


class InvalidSignature(ValueError):
    """A delivery whose signature does not check out with the secret, or whose
    timestamp is more than :data:`TOLERANCE_SECONDS` away: not from troth, or
    replayed."""


def receive(
    secret: str | Sequence[str], headers: Mapping[str, str], body: bytes, now: float | None = None
) -> Delivery:
    """A delivery's body, once its signature and timestamp check out (headers in any
    case, ``body`` as received, before any parsing; several secrets: any one will do).
    Raises :class:`InvalidSignature`, or pydantic's ``ValidationError`` for a body that
    is not a delivery's."""
    if not verify(secret, {k.lower(): v for k, v in headers.items()}, body, now):
        raise InvalidSignature("the delivery's signature or timestamp does not check out")
    return Delivery.model_validate_json(body)


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


def public_brief(info: dict[str, Any]) -> dict[str, Any]:
    """What fired a commitment, or satisfied a leaf of its trigger (``fired_by``, a
    ``progress`` entry, a delivery's ``trigger``) as its JSON shows it: with times as
    ISO 8601 ``*_at``, like every time of a commitment (kept as Unix ms inside, so
    entries stored before this rendering read the same). An event's payload is the
    sender's and shown as sent."""
    out = _times_shown(info)
    event = info.get("event")
    if isinstance(event, dict):
        out["event"] = _times_shown(event)
    return out


def public_trigger(trigger: dict[str, Any]) -> dict[str, Any]:
    """A trigger as its JSON shows it: as created, with a ``time_after``'s fixed time
    as ``due_at`` (ISO 8601), in nested triggers too."""
    out = _times_shown(trigger)
    if isinstance(trigger.get("triggers"), list):
        out["triggers"] = [public_trigger(t) for t in trigger["triggers"]]
    return out


def _times_shown(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its own ``*_ms`` times as ISO 8601 ``*_at`` (``at_ms``: ``at``);
    nested values untouched."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if k.endswith("_ms"):
            out["at" if k == "at_ms" else k[:-3] + "_at"] = iso(v)
        else:
            out[k] = v
    return out


def build(
    commitment_id: str, spec: dict[str, Any], attempt: int, secrets: Sequence[str]
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one attempt of a delivery (``spec`` as
    ``Commitments.deliver`` stores it, with ``fired_ms`` set), signed with each of
    ``secrets``."""
    due, fired = spec.get("due_ms"), spec["fired_ms"]
    body = orjson.dumps(
        {
            "commitment_id": commitment_id,
            "payload": spec.get("payload"),
            "trigger": public_brief(spec["trigger"]) if spec.get("trigger") else None,
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
        "webhook-signature": " ".join(sign(s, commitment_id, ts, body) for s in secrets),
        "idempotency-key": commitment_id,
    }
    return body, headers
