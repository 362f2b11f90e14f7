"""Rotating the webhook signing secret with no delivery refused on the way.

The receiver knows only the old secret when the secret is rotated: a delivery made
right after still checks out, because it carries a signature by each secret. Once
every node signs with the new secret (``signing_everywhere_at``), the receiver moves
to it alone, and the next delivery checks out with the new secret only.

    python examples/commitments/rotation.py
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from demo_kit import Receiver, api


def deliver_one(receiver: Receiver, note: str) -> None:
    before = len(receiver.deliveries)
    with api() as client:
        c = client.create(
            {"type": "time_after", "delay_seconds": 0},
            {"target": receiver.url + "/hook", "payload": {"note": note}},
        )
    got = receiver.wait_for(before + 1)[before]
    assert got.commitment_id == c.id
    print(f"delivered and verified: {got.payload['note']}")


def main() -> None:
    with api() as client:
        old = client.secret()
    receiver = Receiver()  # verifies with the secret it was given: the old one
    with api() as client:
        rotated = client.rotate_secret(keep_previous_seconds=600)
    assert rotated.secret != old and rotated.signing_everywhere_at is not None
    print(f"rotated: the old secret signs beside the new one until {rotated.previous_expires_at}")
    deliver_one(receiver, "the receiver still on the old secret")

    wait = (rotated.signing_everywhere_at - datetime.now(UTC)).total_seconds()
    if wait > 0:
        print(f"{wait:.0f} s until every node signs with the new secret...")
        time.sleep(wait)
    receiver.secrets = [rotated.secret]
    deliver_one(receiver, "the receiver on the new secret alone")
    receiver.close()


if __name__ == "__main__":
    main()
