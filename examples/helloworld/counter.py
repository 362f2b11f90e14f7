"""helloworld: the smallest useful actor, a durable counter.

troth serve --config ca.json.example &
curl -s localhost:8700/v1/actors/counter/alice-c1/increment \
     -H 'content-type: application/json' -d '{"args": [2]}'
troth call counter/alice-c1 get

``Counter`` writes its methods as plain functions: they run on the node's worker
threads, so one that blocks cannot stall other actors (a node pinned to one CPU,
``runtime.cpu``, hands them over about five times faster). ``AsyncCounter`` writes
them as caf.js does, ``async def``: they run on the node's event loop with no thread
hand-off (faster still), and must not block.
"""

from __future__ import annotations

import troth


class Counter(troth.CA):
    state_version = "1.0.0"

    def init(self) -> None:
        self.state["count"] = 0

    def increment(self, by: int = 1) -> int:
        """Add ``by`` (a positive int); returns the new value and notifies subscribers."""
        if not isinstance(by, int) or isinstance(by, bool) or by < 1:
            raise troth.AppError("by must be a positive integer", {"by": by})
        self.state["count"] += by
        self.plugins.session.notify({"count": self.state["count"]})
        return int(self.state["count"])

    def get(self) -> int:
        return int(self.state["count"])


class AsyncCounter(Counter):
    async def init(self) -> None:  # type: ignore[override]
        Counter.init(self)

    async def increment(self, by: int = 1) -> int:  # type: ignore[override]
        return Counter.increment(self, by)

    async def get(self) -> int:  # type: ignore[override]
        return Counter.get(self)
