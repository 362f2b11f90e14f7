"""Escalation: assign at 5 min, escalate at 15, page at 30, unless acknowledged.

One batch creates the three promises; the on-call engineer acknowledges once
assigned, which cancels what has not fired. ``--scale`` shrinks minutes for a demo
(the default turns 5 min into 1 s, 15 into 3 s).

    python examples/commitments/escalation.py [--scale 0.0033] [--ack-after 0.2]
"""

from __future__ import annotations

import argparse
import time

from demo_kit import Receiver, api

LADDER = [("assign", 5), ("escalate", 15), ("page", 30)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.2 / 60, help="seconds per minute")
    ap.add_argument(
        "--ack-after", type=float, default=0.0, help="seconds from the assignment to the ack"
    )
    args = ap.parse_args()
    client, receiver = api(), Receiver()
    made = client.create_many(
        [
            {
                "trigger": {"type": "time_after", "delay_seconds": minutes * 60 * args.scale},
                "obligation": {
                    "target": f"{receiver.url}/{step}",
                    "payload": {"incident": "INC-42", "step": step},
                },
            }
            for step, minutes in LADDER
        ]
    )
    deadline = time.monotonic() + LADDER[1][1] * 60 * args.scale
    while not receiver.deliveries and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(args.ack_after)
    print("incident acknowledged: cancelling the rest of the ladder")
    results = client.cancel_many([c.id for c in made])
    time.sleep(LADDER[-1][1] * 60 * args.scale + 0.5)
    fired = [d.payload["step"] for d in receiver.deliveries]
    cancelled = [LADDER[i][0] for i, r in enumerate(results) if r.status == "cancelled"]
    print("fired:", fired, "cancelled:", cancelled)
    assert fired == ["assign"] and cancelled == ["escalate", "page"]
    receiver.close()


if __name__ == "__main__":
    main()
