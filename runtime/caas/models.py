"""The commitments JSON contract (design section 8), as pydantic models.

Every model forbids unknown fields, so a typo is a 422 naming the field rather
than a silently ignored option.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..plugin import RetryPolicy
from . import filters as _filters

MAX_DEPTH = 4
MAX_CHILDREN = 20
MAX_BATCH = 100
MAX_PAYLOAD_BYTES = 64 * 1024
STATUSES = ("pending", "triggered", "fulfilled", "failed", "cancelled", "expired")
TERMINAL = frozenset({"fulfilled", "failed", "cancelled", "expired"})
TRIGGER_TYPES = ("time_after", "webhook", "tool_complete", "compound", "heartbeat")
#: The event type that ``tool_complete`` triggers listen to.
TOOL_EVENT = "tool_complete"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TimeAfter(_Model):
    type: Literal["time_after"]
    timestamp: datetime | float | None = Field(
        None, description="When to fire: ISO 8601 with timezone, or Unix seconds."
    )
    delay_seconds: float | None = Field(None, ge=0, le=10 * 365 * 86_400)

    @model_validator(mode="after")
    def _one_of(self) -> TimeAfter:
        if (self.timestamp is None) == (self.delay_seconds is None):
            raise ValueError("give exactly one of timestamp or delay_seconds")
        if isinstance(self.timestamp, datetime) and self.timestamp.tzinfo is None:
            raise ValueError("timestamp needs a timezone (e.g. 2026-01-01T10:30:00Z)")
        return self

    def due_ms(self, created_ms: int) -> int:
        if self.delay_seconds is not None:
            return created_ms + int(self.delay_seconds * 1000)
        ts = self.timestamp
        return int((ts.timestamp() if isinstance(ts, datetime) else float(ts or 0)) * 1000)


class EventFilterMixin(_Model):
    filters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("filters")
    @classmethod
    def _valid_filters(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _filters.validate(v)


class Webhook(EventFilterMixin):
    type: Literal["webhook"]
    event_type: str = Field(min_length=1, max_length=200)


class ToolComplete(_Model):
    type: Literal["tool_complete"]
    tool_id: str = Field(min_length=1, max_length=200)
    outcome: str | None = Field(None, max_length=100)


class Heartbeat(EventFilterMixin):
    type: Literal["heartbeat"]
    event_type: str = Field(min_length=1, max_length=200)
    interval_seconds: float = Field(gt=0, le=365 * 86_400)


class Compound(_Model):
    type: Literal["compound"]
    operator: Literal["all", "any"]
    triggers: list[Trigger] = Field(min_length=1, max_length=MAX_CHILDREN)
    window_seconds: float | None = Field(
        None, gt=0, description="For all: every sub-trigger within this window."
    )


Trigger = Annotated[
    TimeAfter | Webhook | ToolComplete | Compound | Heartbeat, Field(discriminator="type")
]
Compound.model_rebuild()


def depth(trigger: Any) -> int:
    if isinstance(trigger, Compound):
        return 1 + max(depth(t) for t in trigger.triggers)
    return 1


def _bounded(value: Any, what: str) -> Any:
    if len(json.dumps(value, separators=(",", ":"))) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"{what} may be at most {MAX_PAYLOAD_BYTES} bytes of JSON")
    return value


class Obligation(_Model):
    target: str = Field(max_length=2048, description="http(s) URL the delivery is POSTed to.")
    payload: Any = None
    headers: dict[str, str] = Field(default_factory=dict, max_length=20)

    @field_validator("payload")
    @classmethod
    def _payload_size(cls, v: Any) -> Any:
        return _bounded(v, "payload")

    @field_validator("target")
    @classmethod
    def _http_only(cls, v: str) -> str:
        from troth.plugins.http import UnsafeTargetError, check_url

        try:
            return check_url(v)
        except UnsafeTargetError as exc:
            raise ValueError(str(exc)) from None


class CommitmentRetry(RetryPolicy):
    """Defaults: 5 attempts, immediate then 5s, 25s, 125s, 625s."""


class CommitmentCreate(_Model):
    trigger: Trigger
    obligation: Obligation
    retry_policy: CommitmentRetry = Field(default_factory=CommitmentRetry)
    expires_at: datetime | float | None = None
    dedup_key: str | None = Field(None, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=50)

    @model_validator(mode="after")
    def _check(self) -> CommitmentCreate:
        if depth(self.trigger) > MAX_DEPTH:
            raise ValueError(f"compound triggers nest at most {MAX_DEPTH} deep")
        if isinstance(self.expires_at, datetime) and self.expires_at.tzinfo is None:
            raise ValueError("expires_at needs a timezone")
        return self

    def expires_ms(self) -> int | None:
        e = self.expires_at
        if e is None:
            return None
        return int((e.timestamp() if isinstance(e, datetime) else float(e)) * 1000)


class BatchCreate(_Model):
    commitments: list[CommitmentCreate] = Field(min_length=1, max_length=MAX_BATCH)


class BatchCancel(_Model):
    ids: list[str] = Field(min_length=1, max_length=MAX_BATCH)


class EventIn(_Model):
    event_type: str = Field(min_length=1, max_length=200)
    event_key: str | None = Field(None, min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)

    @field_validator("payload")
    @classmethod
    def _payload_size(cls, v: dict[str, Any]) -> dict[str, Any]:
        return dict(_bounded(v, "payload"))


def now_ms() -> int:
    return int(time.time() * 1000)
