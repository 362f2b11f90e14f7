"""When to try a side effect again: the retry schedule of outbox entries.

The schedule is part of each committed entry (``OutboxEntry.retry``), so a change
of policy in code never alters effects already promised.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RetryPolicy", "stored_policy"]


class RetryPolicy(BaseModel):
    """When to try an effect again. The default schedule is 0s, 5s, 25s, 125s, 625s."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(5, ge=1, le=100)
    backoff: Literal["exponential", "linear", "fixed"] = "exponential"
    initial_delay_seconds: float = Field(5.0, ge=0, le=86_400)
    max_delay_seconds: float = Field(3_600.0, ge=0, le=7 * 86_400)
    jitter: float = Field(0.0, ge=0, le=1, description="Random +-fraction added to each delay.")

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (1-based; the first is 0)."""
        if attempt <= 1:
            return 0.0
        n = attempt - 1
        if self.backoff == "exponential":
            delay = self.initial_delay_seconds * (5 ** (n - 1))
        elif self.backoff == "linear":
            delay = self.initial_delay_seconds * n
        else:
            delay = self.initial_delay_seconds
        delay = min(delay, self.max_delay_seconds)
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, float(delay))


def stored_policy(retry: RetryPolicy | Mapping[str, Any]) -> dict[str, Any]:
    """``retry`` validated, as an outbox entry keeps it (every field, defaults filled
    in), a dict of its own. A policy given as a dict of plain values is validated
    once and then copied from a cache: each commitment hands its policy, one of a
    few, to every delivery it makes, and validating it again cost a batched creation
    about 2% of its CPU. An invalid one raises ``ValidationError`` every time."""
    if isinstance(retry, RetryPolicy):
        return retry.model_dump()
    try:
        # (values equal as keys, such as 1, 1.0 and True, validate alike here)
        return dict(_validated(tuple(retry.items())))
    except TypeError:  # a value that cannot be a key: validated every time
        return RetryPolicy.model_validate(retry).model_dump()


@functools.lru_cache(maxsize=256)
def _validated(items: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return RetryPolicy.model_validate(dict(items)).model_dump()
