"""reminders: durable timers and an outbound webhook, tested with troth.testing.

``remind_in(seconds, text, url)`` promises a POST of ``{"text": ...}`` to ``url``
after ``seconds``. The promise is a durable timer, so it survives every crash; the
POST is an outbox effect with an idempotency key, retried with backoff until the
receiver answers 2xx, and recorded in the actor's state only once it succeeded.

``tests/test_testing_kit.py`` tests it the way an actor's author would,
with :class:`troth.testing.ActorTestEnv`: a day of waiting takes milliseconds.
"""

from __future__ import annotations

from typing import Any

import troth


class Reminder(troth.CA):
    state_version = "1.0.0"

    def init(self) -> None:
        self.state.update(pending={}, sent=[])

    def remind_in(self, seconds: float, text: str, url: str) -> str:
        if seconds < 0:
            raise troth.AppError("seconds must be >= 0")
        rid = f"r{len(self.state['pending']) + len(self.state['sent']) + 1}"
        self.state["pending"][rid] = {"text": text, "url": url}
        self.plugins.timers.after(seconds, "due", rid, name=rid)
        return rid

    def cancel(self, rid: str) -> bool:
        if self.state["pending"].pop(rid, None) is None:
            return False
        self.plugins.timers.cancel(rid)
        return True

    @troth.internal
    def due(self, rid: str) -> None:
        reminder = self.state["pending"].get(rid)
        if reminder is None:
            return  # cancelled meanwhile
        self.plugins.http.post(
            reminder["url"],
            json={"reminder": rid, "text": reminder["text"]},
            idempotency_key=f"{self.name}:{rid}",
            retry={"max_attempts": 5, "initial_delay_seconds": 60},
            on_result="delivered",
            tag=rid,
        )

    @troth.internal
    def delivered(self, result: dict[str, Any]) -> None:
        rid = result["tag"]
        if result["ok"] and self.state["pending"].pop(rid, None) is not None:
            self.state["sent"].append({"id": rid, "at_ms": self.now_ms})

    def status(self) -> dict[str, Any]:
        return {"pending": sorted(self.state["pending"]), "sent": self.state["sent"]}
