"""crashy: rollback is total. Each failure below leaves state *and* side effects
exactly as they were, while the caller gets a clear error and the actor stays up.

    troth call crashy/alice-x increment 1                 # -> 1
    troth call crashy/alice-x increment '[5, "app"]'      # 409 AppError, still 1
    troth call crashy/alice-x increment '[5, "bug"]'      # 500 ActorError, still 1
    troth call crashy/alice-x increment '[5, "state"]'    # 500 SerializationError, still 1

Every increment also sends a message to a log actor and sets a timer; when the
increment fails, neither happens.

``slow_increment`` is caf.js crashy's "Assertion 1": it reads the count, awaits a
one-second timer inside the message, then writes the count back. Because an actor
takes no other message while one awaits, concurrent callers never lose an update:

    for i in 1 2 3; do troth call crashy/alice-x slow_increment 1 & done; wait
    troth call crashy/alice-x get                         # count went up by exactly 3
"""

from __future__ import annotations

import asyncio
from typing import Any

import troth


class Crashy(troth.CA):
    state_version = "1.0.0"

    def init(self) -> None:
        self.state.update(count=0, seen=[])

    def increment(self, by: int = 1, fail: str | None = None, notify: str | None = None) -> int:
        self.state["count"] += by
        self.state["seen"].append(by)
        if notify:
            self.plugins.send.tell(notify, "record", self.state["count"])
            self.plugins.timers.after(3600, "noop", name=f"t{self.state['count']}")
        if fail == "app":
            raise troth.AppError("refused on purpose", {"count": self.state["count"]})
        if fail == "bug":
            raise RuntimeError("a bug in the actor")
        if fail == "state":
            self.state["socket"] = object()  # not msgpack-serializable
        return int(self.state["count"])

    async def slow_increment(self, by: int = 1, seconds: float = 1.0) -> int:
        """Read, await, write: serialized per actor, so no update is ever lost."""
        before = self.state["count"]
        self.plugins.log.info("slow increment: read %d, waiting %.1fs", before, seconds)
        await asyncio.sleep(seconds)  # other actors run meanwhile; this one waits
        assert self.state["count"] == before, "another message ran during the await"
        self.state["count"] = before + by
        self.state["seen"].append(by)
        return int(self.state["count"])

    def get(self) -> dict[str, Any]:
        return {"count": self.state["count"], "seen": self.state["seen"]}

    def noop(self) -> None:
        pass


class Journal(troth.CA):
    """Receives ``record`` messages; processes each message id exactly once."""

    state_version = "1.0.0"

    def init(self) -> None:
        self.state["records"] = []

    def record(self, value: Any) -> int:
        self.state["records"].append(value)
        return len(self.state["records"])

    def records(self) -> list[Any]:
        return list(self.state["records"])
