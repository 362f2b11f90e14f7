"""Fan-out / fan-in: report once every parallel tool run has completed.

A ``compound`` ``all`` trigger waits for one ``tool_complete`` event per tool; its
progress is committed state, so it survives restarts between the completions.

    python examples/commitments/fanout.py
"""

from __future__ import annotations

import random
import threading
import time

from demo_kit import Receiver, api

TOOLS = ["search", "summarize", "translate", "classify"]


def main() -> None:
    client, receiver = api(), Receiver()
    c = client.create(
        {
            "type": "compound",
            "operator": "all",
            "triggers": [
                {"type": "tool_complete", "tool_id": t, "outcome": "success"} for t in TOOLS
            ],
        },
        {"target": receiver.url + "/report", "payload": {"job": "job-7"}},
    )

    def run(tool: str) -> None:
        time.sleep(random.uniform(0.1, 0.8))
        client.publish("tool_complete", {"tool_id": tool, "outcome": "success"})
        print("completed", tool)

    workers = [threading.Thread(target=run, args=(t,)) for t in TOOLS]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    [report] = receiver.wait_for(1)
    assert report.commitment_id == c.id and report.trigger is not None
    print("fan-in delivered once all tools completed, by the", report.trigger["path"], "event")
    done = client.get(c.id)
    assert sorted(done.progress) == [f"r.{i}" for i in range(len(TOOLS))]
    receiver.close()


if __name__ == "__main__":
    main()
