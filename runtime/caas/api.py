"""``/v1/commitments`` and ``/v1/events``: the Commitment-as-a-Service HTTP API.

Every endpoint acts for the caller's principal only (``local`` when the node has no
API keys): a principal never sees, cancels or triggers another's commitments.
Commitment ids look like ``cm_`` + 32 hex digits; the actor behind one is
``commitment/PRINCIPAL-ID``.

Creation is idempotent in two ways: a repeated ``dedup_key`` returns the existing
commitment (200 instead of 201), and a creation interrupted by a crash is finished,
not duplicated, when it is retried with the same key.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Query, Request

from troth.caas.actor import bus_name, creation, event_types, summary, with_attempts
from troth.caas.delivery import iso, public_brief, public_trigger
from troth.caas.models import (
    MAX_BATCH,
    MAX_PAGE,
    STATUSES,
    TRIGGER_TYPES,
    BatchCancel,
    BatchCreate,
    CancelResults,
    Commitment,
    CommitmentBatch,
    CommitmentCreate,
    CommitmentPage,
    EventIn,
    EventReceipt,
    Reschedule,
    SecretRotation,
    SigningSecret,
    SigningSecretStatus,
    TimeAfter,
)
from troth.caas.plugin import CommitmentsFactory
from troth.caas.signing import REFRESH_SECONDS, SecretState
from troth.core.access import Caller
from troth.core.errors import AppError, BadRequestError, NotFoundError, QuotaExceeded, TrothError
from troth.core.names import ActorName, shard_of
from troth.core.records import OutboxEntry
from troth.edge.http_api import (
    FastJSONResponse,
    Principal,
    ReadOperator,
    WriteOperator,
    body_schema,
    hot,
    json_body,
    resolve_principal,
)
from troth.extension import NodeContext

log = logging.getLogger(__name__)

#: The principal of every call when the node has no API keys (loopback only).
LOCAL_PRINCIPAL = "local"
_ID = re.compile(r"^cm_[0-9a-f]{32}$")
_PRINCIPAL = r"^[a-z0-9][a-z0-9_]{0,62}$"
#: Summaries one search by metadata reads at most (it is a scan).
SEARCH_BUDGET = 100_000


def _attempts(attempts: Any) -> Any:
    if not isinstance(attempts, list):  # a listing's summary counts them
        return attempts
    return [
        {**{k: v for k, v in a.items() if k != "at_ms"}, "at": iso(a.get("at_ms"))}
        for a in attempts
    ]


def _transitions(transitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"status": t["status"], "at": iso(t["at_ms"])} for t in transitions]


def _progress(progress: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {path: public_brief(p) for path, p in progress.items()}


def _if_dict(render: Callable[[dict[str, Any]], Any]) -> Callable[[Any], Any]:
    return lambda value: render(value) if isinstance(value, dict) else value


#: How a field of a commitment's view shows in its JSON: under which name, rendered
#: how; None: not shown (the API's own). Other fields show as they are, but for other
#: ``*_ms`` (a listing's summary keeps times of its own).
_SHOWN: dict[str, tuple[str, Callable[[Any], Any]] | None] = {
    **{
        f"{k}_ms": (f"{k}_at", iso)
        for k in ("created", "updated", "due", "fired", "expires", "retires", "next_attempt")
    },
    "attempts": ("attempts", _attempts),
    "transitions": ("transitions", _transitions),
    "trigger": ("trigger", _if_dict(public_trigger)),
    "fired_by": ("fired_by", _if_dict(public_brief)),
    "progress": ("progress", _if_dict(_progress)),
    "rev": None,
    "delivery": None,
}


def public(view: dict[str, Any]) -> dict[str, Any]:
    """The JSON shape of a commitment: times as ISO 8601 UTC ``*_at``, nested ones
    too (kept as Unix ms inside)."""
    out: dict[str, Any] = {}
    for k, v in view.items():
        if k in _SHOWN:
            shown = _SHOWN[k]
            if shown is not None:
                out[shown[0]] = shown[1](v)
        elif k[-3:] != "_ms":
            out[k] = v
    return out


def key_value(text: str, name: str) -> tuple[str, str]:
    """``KEY=VALUE`` (a metadata search's query parameter ``name``) as its two parts."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise BadRequestError(f"{name} must be KEY=VALUE")
    return key, value


def shown_secret(principal: str, state: SecretState, now_ms: int) -> dict[str, Any]:
    """A principal's secrets as :class:`SigningSecret` shows them (not the previous
    secret itself: a receiver that still needs it has it)."""
    return {"principal": principal, "secret": state.current, **_rotation(state, now_ms)}


def secret_status(principal: str, state: SecretState | None, now_ms: int) -> dict[str, Any]:
    """:class:`SigningSecretStatus`: no secret in it (``state`` None: none made yet)."""
    if state is None:
        return {"principal": principal, "made": False, "configured": False}
    return {"principal": principal, "made": True, **_rotation(state, now_ms)}


def _rotation(state: SecretState, now_ms: int) -> dict[str, Any]:
    rotated = state.rotated_ms
    until = state.previous_until_ms
    return {
        "configured": bool(state.configured),
        "rotated_at": iso(rotated),
        "signing_everywhere_at": iso(rotated + int(REFRESH_SECONDS * 1000)) if rotated else None,
        "previous_expires_at": iso(until) if until and until > now_ms else None,
    }


def commitments_router(node: NodeContext) -> APIRouter:
    factory = node.plugins["commitments"]
    assert isinstance(factory, CommitmentsFactory)
    index = factory.index
    api = APIRouter(prefix="/v1", tags=["commitments"])

    def actor(principal: str, cid: str) -> ActorName:
        return ActorName("commitment", f"{principal}-{cid}")

    async def call(
        principal: str,
        name: ActorName,
        method: str,
        *args: Any,
        request_id: str | None = None,
        reply_cache: bool = True,
        fresh: bool = False,
        together: bool = False,
    ) -> Any:
        """Call a built-in actor's internal method for ``principal`` (who asked)."""
        caller = Caller(principal, internal=True)
        return await node.call(
            name,
            method,
            list(args),
            {},
            request_id,
            caller,
            reply_cache=reply_cache,
            fresh=fresh,
            together=together,
        )

    async def on_commitment(principal: str, cid: str, method: str, *args: Any) -> dict[str, Any]:
        """Call a commitment's method; 404 for an id that is not one of ``principal``'s
        commitments (the actor refuses and writes nothing), saying so if it was retired.
        On Redis Cluster the index is updated after a change (cancel, retry, reschedule)
        before the reply, so that the caller's next listing shows it (the commitment's
        outbox updates it too); on a single Redis the change's commit did."""
        if _ID.match(cid):
            name = actor(principal, cid)
            try:
                view = dict(await call(principal, name, method, *args))
                if method != "get" and factory.inline_index is None:
                    await index.apply(principal, summary(view))
                if method == "get" and view.get("delivery"):
                    return await delivering(name, view)
                return view
            except NotFoundError:
                retired = await asyncio.to_thread(index.retired_at, principal, cid)
                if retired is not None:
                    raise NotFoundError(
                        f"commitment {cid!r} was retired at {iso(retired)}: finished "
                        "commitments are deleted after plugins.commitments.retention_seconds"
                    ) from None
        raise NotFoundError(f"no commitment {cid!r}")

    async def delivering(name: ActorName, view: dict[str, Any]) -> dict[str, Any]:
        """``view`` of a triggered commitment with what its delivery's ledger entry
        knows until the outcome reaches the commitment: the attempts so far, when it
        fired (an armed delivery fires at its first attempt) and when the next attempt
        is due. If the outcome reaches the commitment between the two reads, the view
        is the commitment's own (the attempts come with the next GET)."""
        outbox = node.keys.shard(shard_of(name, node.keys.shard_count)).outbox
        raw = await asyncio.to_thread(node.client.hget, outbox, view["delivery"])
        if raw is None:  # the outcome reached the commitment meanwhile
            return view
        entry = OutboxEntry.load(view["delivery"], raw)
        fired = view["fired_ms"] or entry.spec.get("fired_ms")
        transitions = view["transitions"]
        if fired is not None and transitions[-1]["status"] != "triggered":
            transitions = [*transitions, {"status": "triggered", "at_ms": fired}]
        return {
            **view,
            "fired_ms": fired,
            "transitions": transitions,
            "attempts": with_attempts(view["attempts"], entry.history),
            "next_attempt_ms": entry.next_ms if entry.status == "pending" else None,
        }

    async def search_metadata(
        principal: str,
        query: str,
        name: str,
        status: str | None,
        trigger_type: str | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[dict[str, Any]], str | None, bool]:
        """A search by the ``KEY=VALUE`` in the query parameter ``name`` (see
        :meth:`CommitmentIndex.search_metadata`), off the loop."""
        key, value = key_value(query, name)
        return await asyncio.to_thread(
            index.search_metadata,
            principal,
            key,
            value,
            status,
            trigger_type,
            limit,
            cursor,
            SEARCH_BUDGET,
        )

    async def answer(who: str | None, cid: str, method: str) -> FastJSONResponse:
        """The JSON of a commitment after ``method`` (see :func:`on_commitment`)."""
        return FastJSONResponse(public(await on_commitment(who or LOCAL_PRINCIPAL, cid, method)))

    def check_pending_quota(principal: str, pending: int, adding: int) -> None:
        limit = node.config.quotas.of(principal).pending_commitments
        if pending + adding > limit:
            raise QuotaExceeded(
                f"principal {principal!r} has {pending} pending commitments; its quota is {limit}",
                60,
            )

    async def refuse_lapsed(principal: str, specs: list[CommitmentCreate], batch: bool) -> None:
        """Refuse (422, before anything is written) a commitment that would expire
        before it could fire: an ``expires_at`` already past (a wrong time zone, a
        stale request), or not after a lone ``time_after``'s due time. It would only
        ever become ``expired``. A resend of a creation that landed passes (its
        ``dedup_key`` is bound): it answers with that commitment, as a resend must."""
        now = node.clock.now_ms()
        for i, spec in enumerate(specs):
            expires = spec.expires_ms()
            if expires is None:
                continue
            trigger = spec.trigger
            fires = trigger.due_ms(now) if isinstance(trigger, TimeAfter) else now
            if expires > fires:
                continue
            if spec.dedup_key is not None and await index.bound(principal, spec.dedup_key):
                continue
            field = f"commitments[{i}].expires_at" if batch else "expires_at"
            when = "it is due" if isinstance(trigger, TimeAfter) else "now"
            raise BadRequestError(
                f"{field} {iso(expires)} is not after {when} ({iso(fires)}): "
                "the commitment could never fire"
            )

    async def create_many(
        principal: str, specs: list[CommitmentCreate]
    ) -> list[tuple[dict[str, Any], bool]]:
        """The creations of one request, each one commit of its commitment, and whether
        it is new (not the one its ``dedup_key`` already named).

        On a single Redis that commit is all there is: it also indexes the commitment,
        binds its ``dedup_key`` and checks the pending quota, atomically (see
        ``CommitmentIndex.step``); a batch's quota is checked first as a whole too. On
        Redis Cluster the index has a slot of its own: the ``dedup_key`` bindings and
        the quota check come first, the index updates after (one request each)."""
        quota = node.config.quotas.of(principal).pending_commitments
        cids = [f"cm_{secrets.token_hex(16)}" for _ in specs]
        inline = factory.inline_index is not None
        if inline:
            bound = cids
            if len(specs) > 1:
                check_pending_quota(principal, await index.pending(principal), len(specs))
        else:
            pending, bound = await index.admit(
                principal, [(spec.dedup_key, cid) for spec, cid in zip(specs, cids, strict=True)]
            )
            # A known dedup_key names a commitment that exists, or whose creation is
            # under way (a concurrent request) or was interrupted (a crash): create is
            # idempotent, so creating it again returns it as it is, or finishes it.
            try:
                check_pending_quota(principal, pending, len(specs))
            except QuotaExceeded:
                for spec, cid, got in zip(specs, cids, bound, strict=True):
                    if spec.dedup_key is not None and got == cid:  # bound just now: unbind
                        await asyncio.to_thread(index.unbind_dedup, principal, spec.dedup_key, cid)
                raise

        # All at once (at most MAX_BATCH): their commits share the batcher's round trips,
        # and those of another node's commitments share one forwarded request. create
        # needs no cached reply (a second create returns the commitment as it is): that
        # saves about 1 KB of Redis per commitment. A new id names no actor yet: its
        # activation reads no checkpoint.
        names = [actor(principal, got) for got in bound]
        outcomes = await node.call_many(
            names,
            "create",
            [[creation(spec, quota)] for spec in specs],
            Caller(principal, internal=True),
            fresh=[got == cid for cid, got in zip(cids, bound, strict=True)],
        )

        async def finish(name: ActorName, view: dict[str, Any]) -> dict[str, Any]:
            """``view`` once its commitment hears its events: subscribed before the
            reply, so that every event POSTed after it reaches the commitment (whose
            own subscribe, 30 s later, is only a backstop)."""
            try:
                for event_type in event_types(view["trigger"]):
                    bus = ActorName.parse(bus_name(principal, event_type))
                    await call(principal, bus, "subscribe", str(name))
            except AppError:
                await call(principal, name, "cancel")  # it could never hear its events
                raise
            return view

        async def existing(error: AppError) -> dict[str, Any]:
            """The commitment a refused creation's ``dedup_key`` names (a single Redis)."""
            other = error.data.get("dedup_of") if isinstance(error.data, dict) else None
            if other is None:
                raise error
            view: dict[str, Any] = await call(
                principal, actor(principal, other), "get", together=True
            )
            return view

        for outcome in outcomes:
            if isinstance(outcome, Exception) and not isinstance(outcome, AppError):
                raise outcome
        # (new: not refused for a dedup_key, nor bound to an existing commitment's id)
        made = [
            (view, got == cid and not isinstance(view, AppError))
            for view, cid, got in zip(outcomes, cids, bound, strict=True)
        ]
        later = {
            i: existing(view) if isinstance(view, AppError) else finish(names[i], view)
            for i, view in enumerate(outcomes)
            if isinstance(view, AppError) or event_types(view["trigger"])
        }
        if later:
            views = await asyncio.gather(*later.values())
            for i, view in zip(later, views, strict=True):
                made[i] = (view, made[i][1])
        if not inline:
            # The commitment's outbox indexes it too (durably, after a crash, a second
            # later); doing it here as well means a listing or the pending quota sees it
            # as soon as this reply is sent.
            await index.apply_many(principal, [summary(view) for view, _ in made])
        return made

    @api.post(
        "/commitments",
        status_code=201,
        response_model=Commitment,
        openapi_extra=body_schema(CommitmentCreate),
        summary="Create a commitment (200 with the existing one for a known dedup_key)",
    )
    @hot
    async def create(request: Request) -> FastJSONResponse:
        who = resolve_principal(request)  # not a dependency: see HotPath
        spec = await json_body(request, CommitmentCreate)
        await refuse_lapsed(who or LOCAL_PRINCIPAL, [spec], batch=False)
        ((view, created),) = await create_many(who or LOCAL_PRINCIPAL, [spec])
        return FastJSONResponse(public(view), status_code=201 if created else 200)

    @api.post(
        "/commitments/batch",
        status_code=201,
        response_model=CommitmentBatch,
        openapi_extra=body_schema(BatchCreate),
        summary=f"Create up to {MAX_BATCH} commitments; all are validated first",
    )
    @hot
    async def create_batch(request: Request) -> FastJSONResponse:
        who = resolve_principal(request)
        batch = await json_body(request, BatchCreate)
        await refuse_lapsed(who or LOCAL_PRINCIPAL, batch.commitments, batch=True)
        made = await create_many(who or LOCAL_PRINCIPAL, batch.commitments)
        return FastJSONResponse({"commitments": [public(v) for v, _ in made]}, status_code=201)

    @api.post(
        "/commitments/batch/cancel",
        response_model=CancelResults,
        openapi_extra=body_schema(BatchCancel),
        summary="Cancel several commitments; each gets its own result",
    )
    async def cancel_batch(request: Request, who: Principal) -> FastJSONResponse:
        ids = (await json_body(request, BatchCancel)).ids
        principal = who or LOCAL_PRINCIPAL

        async def one(cid: str) -> dict[str, Any]:
            try:
                view = await on_commitment(principal, cid, "cancel")
            except TrothError as exc:
                return {"id": cid, "error": exc.to_dict()}
            return {"id": cid, "status": view["status"]}

        return FastJSONResponse({"results": await asyncio.gather(*(one(c) for c in ids))})

    @api.get(
        "/commitments", response_model=CommitmentPage, summary="List commitments, newest first"
    )
    async def list_(
        who: Principal,
        status: str | None = Query(None, description=f"One of {', '.join(STATUSES)}"),
        trigger_type: str | None = Query(None, description=f"One of {', '.join(TRIGGER_TYPES)}"),
        limit: int = Query(50, ge=1, le=MAX_PAGE),
        cursor: str | None = Query(None, max_length=200, pattern=r"^\d+:cm_[0-9a-f]{32}$"),
        dedup_key: str | None = Query(
            None, min_length=1, max_length=200, description="Only the one with this dedup_key"
        ),
        metadata: str | None = Query(
            None,
            max_length=400,
            description="KEY=VALUE: only those whose metadata has it. A key listed in "
            "`indexed_metadata` reads its index, a page at a time; any other is a scan of "
            f"at most {SEARCH_BUDGET:,} commitments, one page (`truncated` says it "
            "stopped there)",
        ),
    ) -> FastJSONResponse:
        if status is not None and status not in STATUSES:
            raise BadRequestError(f"status must be one of {list(STATUSES)}")
        if trigger_type is not None and trigger_type not in TRIGGER_TYPES:
            raise BadRequestError(f"trigger_type must be one of {list(TRIGGER_TYPES)}")
        principal = who or LOCAL_PRINCIPAL
        if dedup_key is not None and metadata is not None:
            raise BadRequestError("give dedup_key or metadata, not both")
        truncated = False
        if dedup_key is not None:
            if cursor is not None:
                raise BadRequestError("a search by dedup_key has one page: no cursor")
            cid = await index.bound(principal, dedup_key)
            found = await asyncio.to_thread(index.find, principal, cid) if cid else []
            items = [
                i
                for i in found
                if (status is None or i["status"] == status)
                and (trigger_type is None or i.get("trigger_type") == trigger_type)
            ]
            nxt = None
        elif metadata is not None:
            items, nxt, truncated = await search_metadata(
                principal, metadata, "metadata", status, trigger_type, limit, cursor
            )
        else:
            items, nxt = await asyncio.to_thread(
                index.page, principal, status, trigger_type, limit, cursor
            )
            return FastJSONResponse({"items": [public(i) for i in items], "next_cursor": nxt})
        return FastJSONResponse(
            {"items": [public(i) for i in items], "next_cursor": nxt, "truncated": truncated}
        )

    @api.get(
        "/commitments/{cid}",
        response_model=Commitment,
        summary="A commitment with its delivery attempts",
    )
    async def get(cid: str, who: Principal) -> FastJSONResponse:
        return await answer(who, cid, "get")

    @api.delete(
        "/commitments/{cid}",
        response_model=Commitment,
        summary="Cancel a pending or failed commitment (409 if not)",
    )
    async def cancel(cid: str, who: Principal) -> FastJSONResponse:
        return await answer(who, cid, "cancel")

    @api.post(
        "/commitments/{cid}/retry",
        response_model=Commitment,
        summary="Re-drive a failed commitment (409 if not)",
    )
    async def retry(cid: str, who: Principal) -> FastJSONResponse:
        return await answer(who, cid, "retry")

    @api.post(
        "/commitments/{cid}/reschedule",
        response_model=Commitment,
        openapi_extra=body_schema(Reschedule),
        summary="Move a pending time_after commitment's due time (409 if it cannot move)",
    )
    async def reschedule(cid: str, request: Request, who: Principal) -> FastJSONResponse:
        when = await json_body(request, Reschedule)
        args = when.model_dump(mode="json")
        if when.timestamp is not None:
            args["due_ms"] = when.due_ms(0)
        view = await on_commitment(who or LOCAL_PRINCIPAL, cid, "reschedule", args)
        return FastJSONResponse(public(view))

    @api.post(
        "/events",
        status_code=202,
        response_model=EventReceipt,
        openapi_extra=body_schema(EventIn),
        summary="Record an event and fan it out to the commitments waiting for it",
    )
    @hot
    async def event(request: Request) -> FastJSONResponse:
        who = resolve_principal(request)
        ev = await json_body(request, EventIn)
        principal = who or LOCAL_PRINCIPAL
        await asyncio.to_thread(node.quotas.check_rate, principal)
        event_id = f"ev_{secrets.token_hex(16)}"
        body = {
            "event_id": event_id,
            "event_type": ev.event_type,
            "event_key": ev.event_key,
            "payload": ev.payload,
            "received_ms": node.clock.now_ms(),
        }
        result = await call(
            principal,
            ActorName.parse(bus_name(principal, ev.event_type)),
            "publish",
            body,
            request_id=event_id,
        )
        return FastJSONResponse(
            {"event_id": event_id, "event_type": ev.event_type, **result}, status_code=202
        )

    # -- operators: every principal's commitments (the console) ---------------------------

    @api.get("/admin/commitments/principals", tags=["operators"], summary="Principals, counts")
    async def admin_principals(_: ReadOperator) -> dict[str, Any]:
        counts = await asyncio.to_thread(index.counts)
        by: dict[str, dict[str, int]] = {}
        for (principal, status), n in counts.items():
            by.setdefault(principal, {})[status] = n
        principals = await asyncio.to_thread(index.principals)
        return {"principals": [{"principal": p, "counts": by.get(p, {})} for p in principals]}

    @api.get(
        "/admin/commitments",
        tags=["operators"],
        summary="One principal's commitments by status, or found by id, dedup_key or metadata",
    )
    async def admin_list(
        _: ReadOperator,
        principal: str = Query(LOCAL_PRINCIPAL, pattern=_PRINCIPAL),
        status: str | None = Query(None, description=f"One of {', '.join(STATUSES)}"),
        q: str | None = Query(None, max_length=200, description="A commitment id or dedup_key"),
        meta: str | None = Query(None, max_length=400, description="KEY=VALUE of its metadata"),
        limit: int = Query(50, ge=1, le=MAX_PAGE),
        cursor: str | None = Query(None, max_length=200, pattern=r"^\d+:cm_[0-9a-f]{32}$"),
    ) -> dict[str, Any]:
        if status is not None and status not in STATUSES:
            raise BadRequestError(f"status must be one of {list(STATUSES)}")
        truncated, nxt = False, None
        if q:
            items = await asyncio.to_thread(index.find, principal, q)
        elif meta:
            items, nxt, truncated = await search_metadata(
                principal, meta, "meta", status, None, limit, cursor
            )
        else:
            items, nxt = await asyncio.to_thread(index.page, principal, status, None, limit, cursor)
        return {"items": [public(i) for i in items], "next_cursor": nxt, "truncated": truncated}

    def checked(principal: str) -> str:
        if not re.match(_PRINCIPAL, principal):
            raise BadRequestError(f"principal must match {_PRINCIPAL}")
        return principal

    @api.get(
        "/admin/commitments/{principal}/{cid}",
        response_model=Commitment,
        tags=["operators"],
        summary="A commitment with its transitions and delivery attempts",
    )
    async def admin_get(principal: str, cid: str, _: ReadOperator) -> FastJSONResponse:
        return await answer(checked(principal), cid, "get")

    @api.post(
        "/admin/commitments/{principal}/{cid}/retry",
        response_model=Commitment,
        tags=["operators"],
        summary="Re-drive a failed commitment (a dead letter)",
    )
    async def admin_retry(principal: str, cid: str, _: WriteOperator) -> FastJSONResponse:
        return await answer(checked(principal), cid, "retry")

    @api.post(
        "/admin/commitments/{principal}/{cid}/cancel",
        response_model=Commitment,
        tags=["operators"],
        summary="Cancel a pending or failed commitment",
    )
    async def admin_cancel(principal: str, cid: str, _: WriteOperator) -> FastJSONResponse:
        return await answer(checked(principal), cid, "cancel")

    @api.get(
        "/commitments-secret",
        response_model=SigningSecret,
        summary="This principal's webhook signing secret",
    )
    async def secret(who: Principal) -> FastJSONResponse:
        principal = who or LOCAL_PRINCIPAL
        state = await factory.secrets.state(principal, fresh=True)
        return FastJSONResponse(shown_secret(principal, state, node.clock.now_ms()))

    @api.post(
        "/commitments-secret/rotate",
        response_model=SigningSecret,
        openapi_extra=body_schema(SecretRotation),
        summary="A new signing secret; the current one signs beside it for a while",
    )
    async def rotate_secret(request: Request, who: Principal) -> FastJSONResponse:
        return await rotated(request, who or LOCAL_PRINCIPAL, "itself")

    @api.get(
        "/admin/commitments-secret/{principal}",
        response_model=SigningSecretStatus,
        tags=["operators"],
        summary="Where a principal's signing secret stands (never the secret itself)",
    )
    async def admin_secret(principal: str, _: ReadOperator) -> FastJSONResponse:
        state = await factory.secrets.peek(checked(principal))
        return FastJSONResponse(secret_status(principal, state, node.clock.now_ms()))

    @api.post(
        "/admin/commitments-secret/{principal}/rotate",
        response_model=SigningSecret,
        openapi_extra=body_schema(SecretRotation),
        tags=["operators"],
        summary="Rotate a principal's signing secret (e.g. when it leaked)",
    )
    async def admin_rotate_secret(
        principal: str, request: Request, _: WriteOperator
    ) -> FastJSONResponse:
        who = resolve_principal(request)
        return await rotated(request, checked(principal), f"operator {who or LOCAL_PRINCIPAL}")

    async def rotated(request: Request, principal: str, by: str) -> FastJSONResponse:
        rotation = await json_body(request, SecretRotation)
        now_ms = node.clock.now_ms()
        try:
            state = await factory.secrets.rotate(principal, rotation.keep_previous_seconds, now_ms)
        except ValueError as exc:  # a configured secret
            raise AppError(str(exc)) from None
        log.info(
            "principal %s's signing secret rotated by %s; the previous one signs %ss more",
            principal,
            by,
            rotation.keep_previous_seconds,
        )
        return FastJSONResponse(shown_secret(principal, state, now_ms))

    return api
