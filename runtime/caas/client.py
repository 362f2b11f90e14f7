"""A Python client of the commitments API, sync and asyncio, over httpx.

::

    from troth.caas.client import Commitments

    with Commitments("http://127.0.0.1:8700", token="...") as cs:
        c = cs.create(
            {"type": "time_after", "delay_seconds": 60},
            {"target": "https://example.com/hook", "payload": {"order": 17}},
            dedup_key="order-17",
        )
        cs.get(c.id).status                       # "pending"
        cs.publish("payment.completed", {"amount": 150})

:class:`AsyncCommitments` is the same API with ``await``. Both speak only the public
HTTP API (the contract in the README), so they work against any troth node.

Guarantees:

* a request is checked against the contract's models before it is sent: a typo or a
  bound crossed raises pydantic's ``ValidationError`` naming the field, and nothing is
  sent;
* answers are parsed into :mod:`troth.caas.models` (:class:`Commitment`, ...), which
  keep fields they do not know (a newer node may add some);
* errors raise troth's own classes, rebuilt from the error body: ``AppError`` (409; its
  ``data`` says why, e.g. ``{"status": "triggered"}``), ``NotFoundError`` (404, also
  for a commitment retired after its retention), ``BadRequestError`` (422),
  ``QuotaExceeded`` (429), ``AuthError`` / ``ForbiddenError``;
* a request the node answers 503 (nothing was done: an actor moving, Redis away) is
  sent again after its ``Retry-After``, and one whose connection a node refused goes
  to the next of ``urls``, until ``timeout`` has passed; requests go first to the node
  that answered last;
* a request whose answer was lost after it was sent is sent again only when
  repeating it is harmless: reads, cancels, creates with a ``dedup_key``, events
  with an ``event_key``. Otherwise it raises ``CallTimeout``: it may have been
  applied. Give creates a ``dedup_key`` and a repeat returns the commitment the first
  one made.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from troth.caas.models import (
    KEEP_PREVIOUS_SECONDS,
    MAX_PAGE,
    BatchCancel,
    BatchCreate,
    CancelResult,
    CancelResults,
    Commitment,
    CommitmentBatch,
    CommitmentCreate,
    CommitmentPage,
    CommitmentSummary,
    EventIn,
    EventReceipt,
    Obligation,
    Reschedule,
    SecretRotation,
    SigningSecret,
    Status,
)
from troth.core.errors import CallTimeout, TrothError, error_from_dict

T = TypeVar("T")

#: Longest wait for a node's Retry-After (a node asks for 1 s; longer is not its word).
MAX_RETRY_AFTER = 5.0


@dataclass(frozen=True)
class Request(Generic[T]):
    """One call of the API: what to send, whether sending it twice is harmless, and
    how to read its answer. The sync and async clients differ only in how they send."""

    method: str
    path: str
    read: Callable[[Any], T]
    body: Any = None
    params: dict[str, Any] | None = None
    repeatable: bool = True

    def to(self, url: str) -> dict[str, Any]:
        """The arguments of ``httpx``'s ``request`` that send it to the node at ``url``."""
        return {
            "method": self.method,
            "url": url + self.path,
            "json": self.body,
            "params": self.params,
        }


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_unset=True)


def _spec(
    trigger: Any,
    obligation: Obligation | dict[str, Any],
    retry_policy: Any,
    expires_at: datetime | float | None,
    dedup_key: str | None,
    metadata: dict[str, Any] | None,
) -> CommitmentCreate:
    body = {"trigger": trigger, "obligation": obligation}
    optional = {
        "retry_policy": retry_policy,
        "expires_at": expires_at,
        "dedup_key": dedup_key,
        "metadata": metadata,
    }
    body.update((k, v) for k, v in optional.items() if v is not None)
    return CommitmentCreate.model_validate(body)


def create(spec: CommitmentCreate) -> Request[Commitment]:
    return Request(
        "POST",
        "/v1/commitments",
        Commitment.model_validate,
        _dump(spec),
        repeatable=spec.dedup_key is not None,
    )


def create_many(specs: Sequence[CommitmentCreate]) -> Request[list[Commitment]]:
    batch = BatchCreate(commitments=list(specs))
    return Request(
        "POST",
        "/v1/commitments/batch",
        lambda body: CommitmentBatch.model_validate(body).commitments,
        _dump(batch),
        repeatable=all(s.dedup_key is not None for s in batch.commitments),
    )


def get(cid: str) -> Request[Commitment]:
    return Request("GET", f"/v1/commitments/{_id(cid)}", Commitment.model_validate)


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must lie between 1 and {MAX_PAGE}")


def page(
    status: Status | None, trigger_type: str | None, limit: int, cursor: str | None
) -> Request[CommitmentPage]:
    _check_limit(limit)
    params = {"status": status, "trigger_type": trigger_type, "limit": limit, "cursor": cursor}
    return Request(
        "GET",
        "/v1/commitments",
        CommitmentPage.model_validate,
        params={k: v for k, v in params.items() if v is not None},
    )


def search(
    dedup_key: str | None,
    metadata: dict[str, str] | None,
    status: Status | None,
    trigger_type: str | None,
    limit: int,
    cursor: str | None = None,
) -> Request[CommitmentPage]:
    if (dedup_key is None) == (metadata is None):
        raise ValueError("search by dedup_key or by metadata (one of them)")
    if metadata is not None and len(metadata) != 1:
        raise ValueError("search by one metadata key and its value")
    _check_limit(limit)
    params: dict[str, Any] = {"limit": limit}
    if dedup_key is not None:
        params["dedup_key"] = dedup_key
    if metadata is not None:
        [(key, value)] = metadata.items()
        params["metadata"] = f"{key}={value}"
    optional = (("status", status), ("trigger_type", trigger_type), ("cursor", cursor))
    params.update((k, v) for k, v in optional if v)
    return Request("GET", "/v1/commitments", CommitmentPage.model_validate, params=params)


def cancel(cid: str) -> Request[Commitment]:
    return Request("DELETE", f"/v1/commitments/{_id(cid)}", Commitment.model_validate)


def cancel_many(ids: Sequence[str]) -> Request[list[CancelResult]]:
    body = _dump(BatchCancel(ids=[_id(cid) for cid in ids]))
    return Request(
        "POST",
        "/v1/commitments/batch/cancel",
        lambda answer: CancelResults.model_validate(answer).results,
        body,
    )


def retry(cid: str) -> Request[Commitment]:
    """Not repeatable: a second re-drive of a delivery that failed again is another."""
    return Request(
        "POST", f"/v1/commitments/{_id(cid)}/retry", Commitment.model_validate, repeatable=False
    )


def _when(timestamp: datetime | float | None, delay_seconds: float | None) -> Reschedule:
    return Reschedule.model_validate({"timestamp": timestamp, "delay_seconds": delay_seconds})


def reschedule(cid: str, when: Reschedule) -> Request[Commitment]:
    """Repeatable only at a timestamp: a delay counts from when the node takes it."""
    return Request(
        "POST",
        f"/v1/commitments/{_id(cid)}/reschedule",
        Commitment.model_validate,
        _dump(when),
        repeatable=when.timestamp is not None,
    )


def publish(
    event_type: str, payload: dict[str, Any] | None, event_key: str | None
) -> Request[EventReceipt]:
    event = EventIn.model_validate(
        {"event_type": event_type, "payload": payload or {}, "event_key": event_key}
    )
    return Request(
        "POST",
        "/v1/events",
        EventReceipt.model_validate,
        _dump(event),
        repeatable=event_key is not None,
    )


def secret_info() -> Request[SigningSecret]:
    return Request("GET", "/v1/commitments-secret", SigningSecret.model_validate)


def rotate_secret(keep_previous_seconds: float) -> Request[SigningSecret]:
    """Not repeatable: a second rotation would retire the secret the first made."""
    rotation = SecretRotation(keep_previous_seconds=keep_previous_seconds)
    return Request(
        "POST",
        "/v1/commitments-secret/rotate",
        SigningSecret.model_validate,
        _dump(rotation),
        repeatable=False,
    )


def _id(cid: str) -> str:
    """An id goes into a path: refused here if it could leave it."""
    if not cid or any(c in cid for c in "/?#%") or cid in (".", ".."):
        raise ValueError(f"not a commitment id: {cid!r}")
    return cid


def _error(resp: httpx.Response) -> TrothError:
    try:
        body = resp.json()["error"]
        if not isinstance(body, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        body = {"type": "RemoteError", "message": f"HTTP {resp.status_code}: {resp.text[:200]}"}
    return error_from_dict(body, resp.status_code)


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(resp.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


@dataclass
class _Attempts:
    """Where a request goes next, and whether it may go again (see the module's
    guarantees)."""

    urls: Sequence[str]
    deadline: float
    #: Which of ``urls`` it goes to (modulo their number): first the one that answered
    #: the client last, so that a dead node costs one refused connection, not one a
    #: request.
    index: int = 0
    failed: int = 0

    def after_answer(self, resp: httpx.Response) -> float | None:
        """How long to wait before sending again, or None: ``resp`` is the answer."""
        if resp.status_code != 503:
            return None
        wait = _retry_after(resp)
        return wait if time.monotonic() + wait < self.deadline else None

    def after_failure(self, request: Request[Any], exc: httpx.TransportError) -> float:
        """How long to wait before sending again (to the next URL), or raise."""
        unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
        if not unsent and not request.repeatable:
            raise CallTimeout(
                f"{request.method} {request.path}: no answer ({type(exc).__name__}); it may "
                "have been applied (a create with a dedup_key can be sent again safely)"
            ) from exc
        self.index += 1
        self.failed += 1
        wait = 0.0 if self.failed % len(self.urls) else 0.5  # all tried: a pause
        if time.monotonic() + wait >= self.deadline:
            raise CallTimeout(
                f"{request.method} {request.path}: no node answered in time "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return wait

    @property
    def url(self) -> str:
        return self.urls[self.index % len(self.urls)]


def _answer(request: Request[T], resp: httpx.Response) -> T:
    if resp.status_code >= 400:
        raise _error(resp)
    return request.read(resp.json())


def _urls(urls: str | Sequence[str]) -> list[str]:
    found = [urls] if isinstance(urls, str) else list(urls)
    if not found:
        raise ValueError("give at least one node URL")
    return [u.rstrip("/") for u in found]


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


class _Nodes:
    """What both clients keep between calls: the nodes, how long a call may take in
    all (its resends included), and which node answered last."""

    def __init__(self, urls: str | Sequence[str], timeout: float) -> None:
        self.urls = _urls(urls)
        self.timeout = timeout
        self._answered = 0  # the index in urls of the node that answered last

    def _attempts(self) -> _Attempts:
        return _Attempts(self.urls, time.monotonic() + self.timeout, self._answered)

    def _answered_by(self, attempts: _Attempts) -> None:
        self._answered = attempts.index % len(self.urls)


class Commitments(_Nodes):
    """The commitments API of a troth node (or of any of ``urls``), synchronously."""

    def __init__(
        self,
        urls: str | Sequence[str] = "http://127.0.0.1:8700",
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``transport``: httpx's, e.g. for TLS or proxy settings of your own."""
        super().__init__(urls, timeout)
        self._http = httpx.Client(headers=_headers(token), timeout=timeout, transport=transport)

    def __enter__(self) -> Commitments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, request: Request[T]) -> T:
        """Send one request of this module (see the guarantees above)."""
        attempts = self._attempts()
        while True:
            try:
                resp = self._http.request(**request.to(attempts.url))
            except httpx.TransportError as exc:
                time.sleep(attempts.after_failure(request, exc))
                continue
            self._answered_by(attempts)
            if (wait := attempts.after_answer(resp)) is None:
                return _answer(request, resp)
            time.sleep(wait)

    def create(
        self,
        trigger: Any,
        obligation: Obligation | dict[str, Any],
        *,
        retry_policy: Any = None,
        expires_at: datetime | float | None = None,
        dedup_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Commitment:
        """A new commitment (or, for a known ``dedup_key``, the one it names)."""
        spec = _spec(trigger, obligation, retry_policy, expires_at, dedup_key, metadata)
        return self.send(create(spec))

    def create_many(self, specs: Sequence[CommitmentCreate | dict[str, Any]]) -> list[Commitment]:
        """Up to 100 at once, all checked before any is created; answers in order."""
        return self.send(create_many([CommitmentCreate.model_validate(s) for s in specs]))

    def get(self, cid: str) -> Commitment:
        return self.send(get(cid))

    def cancel(self, cid: str) -> Commitment:
        """Cancel a pending or failed commitment (``AppError`` otherwise: its ``data``
        says the status, ``cancelled`` too when a resend after a lost answer finds the
        first one done)."""
        return self.send(cancel(cid))

    def cancel_many(self, ids: Sequence[str]) -> list[CancelResult]:
        return self.send(cancel_many(ids))

    def retry(self, cid: str) -> Commitment:
        """Re-drive a failed commitment's delivery (a dead letter)."""
        return self.send(retry(cid))

    def reschedule(
        self,
        cid: str,
        timestamp: datetime | float | None = None,
        *,
        delay_seconds: float | None = None,
    ) -> Commitment:
        """Move a pending commitment whose trigger is one ``time_after`` to ``timestamp``
        (a ``datetime`` with a timezone, or Unix seconds), or ``delay_seconds`` from
        now; sooner or later. ``AppError`` (409) if it cannot move: not pending, its
        delivery began, another kind of trigger."""
        return self.send(reschedule(cid, _when(timestamp, delay_seconds)))

    def publish(
        self,
        event_type: str,
        payload: dict[str, Any] | None = None,
        *,
        event_key: str | None = None,
    ) -> EventReceipt:
        """Record an event; the commitments waiting for it fire (once per
        ``event_key``)."""
        return self.send(publish(event_type, payload, event_key))

    def find(self, dedup_key: str) -> CommitmentSummary | None:
        """The commitment created with ``dedup_key``, if any (as listings show it)."""
        found = self.send(search(dedup_key, None, None, None, 1)).items
        return found[0] if found else None

    def search(
        self,
        metadata: dict[str, str],
        status: Status | None = None,
        trigger_type: str | None = None,
        *,
        limit: int = 100,
        cursor: str | None = None,
    ) -> CommitmentPage:
        """Newest first, at most ``limit``, the commitments whose metadata has the one
        ``{key: value}`` given (a number or boolean as JSON writes it: ``"true"``).
        A key the node lists in ``indexed_metadata`` reads its index: pass the page's
        ``next_cursor`` as ``cursor`` for the next. Any other key is a scan of 100,000
        commitments at most, one page, and ``truncated`` says it stopped there."""
        return self.send(search(None, metadata, status, trigger_type, limit, cursor))

    def secret(self) -> str:
        """The principal's webhook signing secret (``whsec_...``)."""
        return self.send(secret_info()).secret

    def secret_info(self) -> SigningSecret:
        """The signing secret, and where its rotation stands."""
        return self.send(secret_info())

    def rotate_secret(self, keep_previous_seconds: float = KEEP_PREVIOUS_SECONDS) -> SigningSecret:
        """A new signing secret. Every node signs with it from ``signing_everywhere_at``
        on; the current one goes on signing beside it for ``keep_previous_seconds``
        (0: it stops at once). Move the receiver to the new one in between."""
        return self.send(rotate_secret(keep_previous_seconds))

    # (last: a method named ``list`` hides the builtin in the annotations after it)
    def list(
        self, status: Status | None = None, trigger_type: str | None = None, *, limit: int = 100
    ) -> Iterator[CommitmentSummary]:
        """Newest first, every page: pages of ``limit`` are fetched as they are read."""
        cursor = None
        while True:
            found = self.send(page(status, trigger_type, limit, cursor))
            yield from found.items
            if not found.next_cursor:
                return
            cursor = found.next_cursor


class AsyncCommitments(_Nodes):
    """:class:`Commitments` with ``await``."""

    def __init__(
        self,
        urls: str | Sequence[str] = "http://127.0.0.1:8700",
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(urls, timeout)
        self._http = httpx.AsyncClient(
            headers=_headers(token), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncCommitments:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, request: Request[T]) -> T:
        attempts = self._attempts()
        while True:
            try:
                resp = await self._http.request(**request.to(attempts.url))
            except httpx.TransportError as exc:
                await asyncio.sleep(attempts.after_failure(request, exc))
                continue
            self._answered_by(attempts)
            if (wait := attempts.after_answer(resp)) is None:
                return _answer(request, resp)
            await asyncio.sleep(wait)

    async def create(
        self,
        trigger: Any,
        obligation: Obligation | dict[str, Any],
        *,
        retry_policy: Any = None,
        expires_at: datetime | float | None = None,
        dedup_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Commitment:
        spec = _spec(trigger, obligation, retry_policy, expires_at, dedup_key, metadata)
        return await self.send(create(spec))

    async def create_many(
        self, specs: Sequence[CommitmentCreate | dict[str, Any]]
    ) -> list[Commitment]:
        return await self.send(create_many([CommitmentCreate.model_validate(s) for s in specs]))

    async def get(self, cid: str) -> Commitment:
        return await self.send(get(cid))

    async def cancel(self, cid: str) -> Commitment:
        return await self.send(cancel(cid))

    async def cancel_many(self, ids: Sequence[str]) -> list[CancelResult]:
        return await self.send(cancel_many(ids))

    async def retry(self, cid: str) -> Commitment:
        return await self.send(retry(cid))

    async def reschedule(
        self,
        cid: str,
        timestamp: datetime | float | None = None,
        *,
        delay_seconds: float | None = None,
    ) -> Commitment:
        return await self.send(reschedule(cid, _when(timestamp, delay_seconds)))

    async def publish(
        self,
        event_type: str,
        payload: dict[str, Any] | None = None,
        *,
        event_key: str | None = None,
    ) -> EventReceipt:
        return await self.send(publish(event_type, payload, event_key))

    async def find(self, dedup_key: str) -> CommitmentSummary | None:
        found = (await self.send(search(dedup_key, None, None, None, 1))).items
        return found[0] if found else None

    async def search(
        self,
        metadata: dict[str, str],
        status: Status | None = None,
        trigger_type: str | None = None,
        *,
        limit: int = 100,
        cursor: str | None = None,
    ) -> CommitmentPage:
        return await self.send(search(None, metadata, status, trigger_type, limit, cursor))

    async def secret(self) -> str:
        return (await self.send(secret_info())).secret

    async def secret_info(self) -> SigningSecret:
        return await self.send(secret_info())

    async def rotate_secret(
        self, keep_previous_seconds: float = KEEP_PREVIOUS_SECONDS
    ) -> SigningSecret:
        return await self.send(rotate_secret(keep_previous_seconds))

    # (last, as in :class:`Commitments`)
    async def list(
        self, status: Status | None = None, trigger_type: str | None = None, *, limit: int = 100
    ) -> AsyncIterator[CommitmentSummary]:
        cursor = None
        while True:
            found = await self.send(page(status, trigger_type, limit, cursor))
            for item in found.items:
                yield item
            if not found.next_cursor:
                return
            cursor = found.next_cursor
