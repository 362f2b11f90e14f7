"""Saga: each step's webhook handler promises the next step, then leaves.

reserve -> charge -> ship. The receiver of step N creates the commitment for step
N+1; troth keeps each promise even if the process that made it dies meanwhile.

    python examples/commitments/saga.py
"""

from __future__ import annotations

from demo_kit import Receiver, api

from troth.caas.models import Delivery

STEPS = ["reserve", "charge", "ship"]


def main() -> None:
    client = api()
    receiver: Receiver

    def on_delivery(d: Delivery) -> None:
        step = d.payload["step"]
        print(f"step {step} done (attempt {d.attempt}, {d.lateness_seconds}s late)")
        nxt = STEPS.index(step) + 1
        if nxt < len(STEPS):
            client.create(
                {"type": "time_after", "delay_seconds": 0.2},
                {"target": receiver.url + "/" + STEPS[nxt], "payload": {"step": STEPS[nxt]}},
                dedup_key=f"order-17-{STEPS[nxt]}",  # a handler run twice promises once
            )

    receiver = Receiver(on_delivery)
    client.create(
        {"type": "time_after", "delay_seconds": 0.2},
        {"target": receiver.url + "/reserve", "payload": {"step": "reserve"}},
    )
    done = receiver.wait_for(len(STEPS))
    assert [d.payload["step"] for d in done] == STEPS
    print("saga complete:", " -> ".join(STEPS))
    receiver.close()


if __name__ == "__main__":
    main()
