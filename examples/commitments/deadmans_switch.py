"""Dead man's switch: alert when the nightly backup stops reporting.

A ``heartbeat`` commitment fires when no ``backup.ok`` event for host db1 arrives
within ``interval_seconds``; every such event resets it.

    python examples/commitments/deadmans_switch.py
"""

from __future__ import annotations

import time

from demo_kit import Receiver, api


def main() -> None:
    client, receiver = api(), Receiver()
    c = client.create(
        {
            "type": "heartbeat",
            "event_type": "backup.ok",
            "filters": {"host": "db1"},
            "interval_seconds": 1.0,
        },
        {"target": receiver.url + "/alert", "payload": {"alert": "db1 backups stopped"}},
    )
    for i in range(5):
        time.sleep(0.5)
        client.publish("backup.ok", {"host": "db1", "run": i})
        print("backup.ok", i)
    assert receiver.deliveries == [], "fired while the heartbeat was alive"
    print("backups stop...")
    [alert] = receiver.wait_for(1, timeout=10)
    print("alert delivered:", alert.payload, "for", c.id)
    receiver.close()


if __name__ == "__main__":
    main()
