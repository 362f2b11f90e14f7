"""The commitments JSON contract, as pydantic models.

Every model of a request forbids unknown fields, so a typo is a 422 naming the field
rather than a silently ignored option. The models of answers (:class:`Commitment` and
the others at the end of this module) keep unknown fields instead: the API documents
its answers with them, and :mod:`troth.caas.client` reads them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from troth.caas import filters as _filters
from troth.core.errors import ErrorDetail
from troth.core.retry import RetryPolicy
from troth.plugins.outbound import MAX_HEADERS, check_headers, check_url

MAX_DEPTH = 4
MAX_CHILDREN = 20
MAX_BATCH = 100
#: Most commitments a listing's page holds.
MAX_PAGE = 500
MAX_PAYLOAD_BYTES = 64 * 1024
Status = Literal["pending", "triggered", "fulfilled", "failed", "cancelled", "expired"]
STATUSES: tuple[str, ...] = get_args(Status)
TERMINAL = frozenset({"fulfilled", "failed", "cancelled", "expired"})
TRIGGER_TYPES = ("time_after", "webhook", "tool_complete", "compound", "heartbeat")
#: The event type that ``tool_complete`` triggers listen to.
TOOL_EVENT = "tool_complete"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: Latest time accepted anywhere (9999-12-31T23:59:59Z): every time troth stores
#: must also print as ISO 8601.
MAX_UNIX_SECONDS = 253_402_300_799


def unix_ms(value: datetime | float, what: str) -> int:
    """A point in time as Unix milliseconds, within 1970..9999 (ValueError otherwise)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{what} needs a timezone (e.g. 2026-01-01T10:30:00Z)")
        try:
            seconds = value.timestamp()
        except (OverflowError, OSError, ValueError):
            seconds = -1.0
    else:
        seconds = float(value)
    if not 0 <= seconds <= MAX_UNIX_SECONDS:
        raise ValueError(f"{what} must lie between 1970-01-01 and 9999-12-31 (UTC)")
    return int(seconds * 1000)


Moment = Annotated[
    datetime | float,
    Field(description="ISO 8601 with timezone, or Unix seconds; 1970 to 9999."),
]


class _When(_Model):
    timestamp: Moment | None = Field(None, description="When to fire.")
    delay_seconds: float | None = Field(None, ge=0, le=10 * 365 * 86_400)

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.timestamp is None) == (self.delay_seconds is None):
            raise ValueError("give exactly one of timestamp or delay_seconds")
        if self.timestamp is not None:
            unix_ms(self.timestamp, "timestamp")
        return self

    def due_ms(self, created_ms: int) -> int:
        if self.delay_seconds is not None:
            return created_ms + int(self.delay_seconds * 1000)
        assert self.timestamp is not None
        return unix_ms(self.timestamp, "timestamp")


class TimeAfter(_When):
    type: Literal["time_after"]


class Reschedule(_When):
    """A new due time for a pending commitment whose trigger is one ``time_after``: a
    ``timestamp``, or ``delay_seconds`` from when the commitment takes it."""


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
    interval_seconds: float = Field(ge=0.1, le=365 * 86_400)


class Compound(_Model):
    type: Literal["compound"]
    operator: Literal["all", "any"]
    triggers: list[Trigger] = Field(min_length=1, max_length=MAX_CHILDREN)
    window_seconds: float | None = Field(
        None, ge=0.01, le=365 * 86_400, description="For all: every sub-trigger within this window."
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
    try:
        size = len(orjson.dumps(value))
    except TypeError as exc:  # e.g. an integer beyond 64 bits, given from Python
        raise ValueError(f"{what} is not storable JSON: {exc}") from None
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(f"{what} may be at most {MAX_PAYLOAD_BYTES} bytes of JSON")
    return value


class Obligation(_Model):
    target: str = Field(max_length=2048, description="http(s) URL the delivery is POSTed to.")
    payload: Any = None
    headers: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_HEADERS,
        description="Extra request headers; framing, hop-by-hop and signature headers are "
        "reserved.",
    )

    @field_validator("payload")
    @classmethod
    def _payload_size(cls, v: Any) -> Any:
        return _bounded(v, "payload")

    @field_validator("target")
    @classmethod
    def _http_only(cls, v: str) -> str:
        return check_url(v)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        return check_headers(v)


class CommitmentRetry(RetryPolicy):
    """Defaults: 5 attempts, immediate then 5s, 25s, 125s, 625s."""


class CommitmentCreate(_Model):
    trigger: Trigger
    obligation: Obligation
    retry_policy: CommitmentRetry = Field(default_factory=CommitmentRetry)
    expires_at: Moment | None = None
    dedup_key: str | None = Field(None, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=50)

    @model_validator(mode="after")
    def _check(self) -> CommitmentCreate:
        if depth(self.trigger) > MAX_DEPTH:
            raise ValueError(f"compound triggers nest at most {MAX_DEPTH} deep")
        if self.expires_at is not None:
            unix_ms(self.expires_at, "expires_at")
        return self

    def expires_ms(self) -> int | None:
        return None if self.expires_at is None else unix_ms(self.expires_at, "expires_at")


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


#: How long a rotated signing secret goes on signing, unless the rotation says.
KEEP_PREVIOUS_SECONDS = 86_400.0
#: The longest a rotated signing secret may go on signing (30 days).
MAX_KEEP_PREVIOUS_SECONDS = 30 * 86_400.0


class SecretRotation(_Model):
    keep_previous_seconds: float = Field(
        KEEP_PREVIOUS_SECONDS,
        ge=0,
        le=MAX_KEEP_PREVIOUS_SECONDS,
        description="How long the current secret goes on signing beside the new one "
        "(0: it stops at once, e.g. when it leaked).",
    )


# -- what the API answers ----------------------------------------------------------------


class _Answer(BaseModel):
    """An answer of the API. Unknown fields are kept, not refused: the contract only
    ever adds fields, and a client older than its node must still read it."""

    model_config = ConfigDict(extra="allow")


class Attempt(_Answer):
    attempt: int = Field(description="1 for the first attempt of the commitment's delivery.")
    at: datetime | None
    status_code: int | None = Field(None, description="The target's answer; None: no answer.")
    error: str | None = None
    duration_ms: float | None = None


class Transition(_Answer):
    status: Status
    at: datetime


class Commitment(_Answer):
    """A commitment, as ``GET /v1/commitments/{id}`` and every write answer it. Times
    are ISO 8601 UTC ``*_at``; ``trigger``, ``fired_by`` and ``progress`` keep the
    created trigger's shape, with a ``time_after``'s fixed time as ``due_at``."""

    id: str
    status: Status
    trigger: dict[str, Any]
    obligation: dict[str, Any]
    retry_policy: dict[str, Any]
    dedup_key: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    fired_by: dict[str, Any] | None = Field(None, description="What fired it (also sent).")
    progress: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="The leaves of its trigger satisfied so far."
    )
    attempts: list[Attempt] = Field(default_factory=list)
    error: str | None = Field(None, description="Why its last attempt failed.")
    transitions: list[Transition] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    due_at: datetime | None = None
    fired_at: datetime | None = None
    expires_at: datetime | None = None
    retires_at: datetime | None = Field(None, description="When a finished one is deleted.")
    next_attempt_at: datetime | None = Field(None, description="While a delivery retries.")


class CommitmentSummary(_Answer):
    """A commitment as a listing shows it."""

    id: str
    status: Status
    trigger_type: str
    target: str
    dedup_key: str | None = None
    created_at: datetime
    updated_at: datetime
    due_at: datetime | None = None
    attempts: int = 0
    retires_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class CommitmentPage(_Answer):
    items: list[CommitmentSummary]
    next_cursor: str | None = Field(None, description="For the next page; None: the last.")
    truncated: bool = Field(
        False, description="A search by metadata stopped before it had looked at every one."
    )


class CommitmentBatch(_Answer):
    commitments: list[Commitment]


class CancelResult(_Answer):
    """One id's outcome in a batch cancel: its ``status`` now, or the ``error``."""

    id: str
    status: Status | None = None
    error: ErrorDetail | None = None


class CancelResults(_Answer):
    results: list[CancelResult]


class EventReceipt(_Answer):
    event_id: str
    event_type: str
    duplicate: bool = Field(description="Its event_key was seen before: nothing fired.")
    delivered_to: int = Field(description="Commitments waiting for it that it reached.")


class _SecretRotation(_Answer):
    """Where the rotation of a principal's signing secret stands."""

    configured: bool = Field(
        False, description="Set in the node's configuration: rotated there, not through the API."
    )
    rotated_at: datetime | None = Field(None, description="When it was last rotated.")
    signing_everywhere_at: datetime | None = Field(
        None, description="From when every node signs with the newest secret (after a rotation)."
    )
    previous_expires_at: datetime | None = Field(
        None, description="Until when the previous secret also signs every delivery."
    )


class SigningSecret(_SecretRotation):
    """A principal's webhook signing secret, and where its rotation stands."""

    principal: str
    secret: str = Field(description="The newest secret (whsec_...): verify with this one.")


class SigningSecretStatus(_SecretRotation):
    """Where a principal's webhook signing secret stands, without the secret: what an
    operator sees (``GET /v1/admin/commitments-secret/{principal}``)."""

    principal: str
    made: bool = Field(description="The principal has a secret (one is made at its first use).")


class Delivery(_Answer):
    """The body of a commitment's delivery, as its target receives it, signed (see
    :func:`troth.caas.delivery.receive`). Every attempt carries the same
    ``commitment_id``, also its ``Idempotency-Key``: a receiver de-duplicates on it."""

    commitment_id: str
    payload: Any = None
    trigger: dict[str, Any] | None = Field(
        None, description="What fired it, as the commitment's fired_by shows it."
    )
    due_at: datetime | None = None
    fired_at: datetime
    lateness_seconds: float = Field(description="From due_at to fired_at.")
    attempt: int = Field(description="1 for the first attempt.")
