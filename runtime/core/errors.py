"""The errors troth raises, and how each one reaches a caller.

Two families matter to a caller:

* :class:`AppError` is the application saying "no": the transaction rolled back,
  the caller gets the error, and retrying the same call is pointless.
* :class:`RetryableError` means the message was not processed (the node lost the
  actor's shard, the actor was moving, Redis was unreachable): nothing was
  committed, and the caller should retry, ideally with the same ``request_id``.

Everything else is a bug or a configuration problem and is reported as such.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    """An error as it travels (HTTP bodies as ``{"error": ...}``, WebSocket replies,
    outbox results): what :meth:`TrothError.to_dict` writes and
    :func:`error_from_dict` reads."""

    type: str
    message: str
    data: Any = None


class TrothError(Exception):
    """Base class of every error troth raises on purpose."""

    http_status: int = 500

    @property
    def type_name(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "message": str(self)}


class AppError(TrothError):
    """Raised by actor code to refuse a request.

    The transaction rolls back (state and every buffered side effect), the caller
    receives ``{"type": "AppError", "message": ..., "data": ...}`` and the actor
    stays active. ``data`` must be JSON-serializable.
    """

    http_status = 409

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.data is not None:
            out["data"] = self.data
        return out


class ActorError(TrothError):
    """Actor code raised something other than :class:`AppError`: a bug.

    The transaction rolled back and the traceback was logged on the node.
    """

    def __init__(self, exc_type: str, message: str) -> None:
        super().__init__(f"{exc_type}: {message}")
        self.exc_type = exc_type


class NotFoundError(TrothError):
    """Unknown actor type, method, or actor (for read-only operations)."""

    http_status = 404


class AuthError(TrothError):
    """Missing or unknown API key."""

    http_status = 401


class ForbiddenError(TrothError):
    """The principal may not reach this actor (its id does not start with ``principal-``)."""

    http_status = 403


class BadRequestError(TrothError):
    """The request itself is malformed: bad name, bad arguments, too large."""

    http_status = 422


class SerializationError(TrothError):
    """State or a reply could not be encoded with msgpack; the message rolled back."""

    http_status = 500


class ActivationError(TrothError):
    """The actor could not be loaded (for example, an incompatible state version).

    The checkpoint is left untouched so that a corrected deployment can load it.
    """

    http_status = 500


class CallTimeout(TrothError):
    """No reply came in time. The call may still commit later: retry it with the same
    ``request_id`` to learn its outcome without running it twice."""

    http_status = 504


class RetryableError(TrothError):
    """Nothing was committed; retry the call (with the same ``request_id``)."""

    http_status = 503


class FencedError(RetryableError):
    """This node no longer owns the actor's shard: its commit was refused."""


class UnavailableError(RetryableError):
    """The actor or its store is temporarily unavailable (moving, overloaded, down)."""


class RedisUnavailable(UnavailableError):
    """Redis did not answer within the configured bound. Nothing new was committed by
    this call (or its outcome is unknown): retry it with the same ``request_id``."""


class QuotaExceeded(TrothError):
    """The principal is over one of its quotas (actors, pending commitments, events/s).

    Answered 429 with ``Retry-After``; nothing was created or changed. ``data``
    says ``retry_after`` too, so that the wait survives a hop between nodes and
    reaches WebSocket clients, which see no headers.
    """

    http_status = 429

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "data": {"retry_after": self.retry_after}}


class RemoteError(TrothError):
    """An error of a kind this process has no class for, as another node reported it."""

    def __init__(self, kind: str, message: str, http_status: int = 500) -> None:
        super().__init__(message)
        self.kind = kind
        self.http_status = http_status

    @property
    def type_name(self) -> str:
        return self.kind


_BY_NAME: dict[str, type[TrothError]] = {
    cls.__name__: cls
    for cls in (
        NotFoundError,
        BadRequestError,
        SerializationError,
        ActivationError,
        CallTimeout,
        RetryableError,
        FencedError,
        UnavailableError,
        RedisUnavailable,
        AuthError,
        ForbiddenError,
        QuotaExceeded,
    )
}


def error_from_dict(data: dict[str, Any], http_status: int = 500) -> TrothError:
    """Rebuild an error received over the wire (HTTP, WebSocket, outbox results)."""
    kind = str(data.get("type", "TrothError"))
    message = str(data.get("message", ""))
    if kind == "AppError":
        return AppError(message, data.get("data"))
    if kind == "QuotaExceeded":
        extra = data.get("data")
        wait = extra.get("retry_after") if isinstance(extra, dict) else None
        return QuotaExceeded(message, wait if isinstance(wait, int) and wait > 0 else 1)
    if kind == "ValidationError":  # the HTTP layer's 422 for a malformed request
        return BadRequestError(message)
    cls = _BY_NAME.get(kind)
    if cls is not None:
        return cls(message)
    if http_status == 503:
        return UnavailableError(message)
    return RemoteError(kind, message, http_status)
