"""A reminder snoozed, then brought forward: one commitment, rescheduled.

An agent promises a reminder in an hour. The user snoozes it to tomorrow; later
the user wants it now after all. The commitment keeps its id, its ``dedup_key`` and
its idempotency key; it is delivered once, at the last time it was given (the
deliveries armed for the earlier times are taken back in the same commits).

    python examples/commitments/snooze.py
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from demo_kit import Receiver, api


def main() -> None:
    receiver = Receiver()
    with api() as client:
        reminder = client.create(
            {"type": "time_after", "delay_seconds": 3600},
            {"target": receiver.url + "/hook", "payload": {"note": "call the dentist"}},
            dedup_key=f"reminder-{datetime.now(UTC):%Y%m%d%H%M%S%f}",
        )
        print(f"due at {reminder.due_at}")
        tomorrow = datetime.now(UTC) + timedelta(days=1)
        snoozed = client.reschedule(reminder.id, tomorrow)
        print(f"snoozed: due at {snoozed.due_at}")
        client.reschedule(reminder.id, delay_seconds=1)
        print("brought forward: due in a second")
        got = receiver.wait_for(1)[0]
        assert got.commitment_id == reminder.id and got.payload == {"note": "call the dentist"}
        print(f"delivered once: {got.payload['note']}")
        # (the commitment records the outcome a moment after the receiver answered)
        deadline = time.monotonic() + 10
        while client.get(reminder.id).status != "fulfilled" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get(reminder.id).status == "fulfilled"
    receiver.close()


if __name__ == "__main__":
    main()
