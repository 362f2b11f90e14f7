"""autonomous: an actor that acts on its own, with no client traffic.

With ``pulse_seconds`` set for its type, ``pulse()`` runs periodically in a
transaction of its own, for as long as the node owns the actor's shard. After a
crash or a move the new owner wakes it up at once: no call is needed.
"""

from __future__ import annotations

from typing import Any

import troth


class Heartbeat(troth.CA):
    state_version = "1.0.0"
    pulse_seconds = 1.0

    def init(self) -> None:
        self.state.update(pulses=0, last_pulse_ms=0)

    def pulse(self) -> None:
        self.state["pulses"] += 1
        self.state["last_pulse_ms"] = self.now_ms
        self.plugins.log.debug("pulse %d", self.state["pulses"])

    def status(self) -> dict[str, Any]:
        return dict(self.state)

    def wake(self) -> bool:
        """Any call activates the actor; after that it keeps pulsing by itself."""
        return True
