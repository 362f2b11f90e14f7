"""The ``commitment`` actor and the ``cmbus`` event bus actors.

A commitment moves ``pending -> triggered -> fulfilled | failed`` or ``pending ->
cancelled | expired``; ``failed -> triggered`` again on a re-drive. Every move is one
transaction, and what it causes (the delivery, bus subscriptions, timers) is
committed with it and performed after, through the outbox; its listing index row is
written by that very commit (on Redis Cluster: through the outbox too).

Triggers form a tree. Each leaf has a path (``r``, ``r.0``, ``r.1.2``...):

* ``time_after`` arms a durable timer; alone (a time-only commitment) it arms the
  delivery itself, committed with the creation and delayed to the due time, which
  then fires without a transaction of its own; ``heartbeat`` arms a timer that every
  matching event re-arms, so it fires only after ``interval_seconds`` of silence;
* ``webhook``, ``tool_complete`` and ``heartbeat`` subscribe the commitment to its
  principal's event bus for their event type;
* ``compound`` ``any`` is satisfied by any child; ``all`` by every child, which
  progress is kept in the committed state; with ``window_seconds`` the children must
  all be satisfied within that window (older satisfactions lapse).

The event bus ``cmbus/PRINCIPAL-HASH`` of one principal and event type keeps its
subscribers (a member set: one write per subscribe) and the recent
``event_key``\\ s; ``publish`` commits the event once, with one outbox entry that
hands it to every subscriber, so the fan-out survives any crash, and a principal's
events never reach another principal's commitments.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from troth.caas import filters
from troth.caas.delivery import iso
from troth.caas.models import TERMINAL, TOOL_EVENT, CommitmentCreate, Compound, TimeAfter
from troth.core.actor import CA, internal
from troth.core.errors import AppError, BadRequestError, NotFoundError
from troth.core.names import ActorName

MAX_SUBSCRIBERS = 10_000
RECENT_EVENT_KEYS = 1000
MAX_ATTEMPTS_KEPT = 100
#: Ids of the events a pending commitment took, kept to ignore a fan-out's repeat.
EVENTS_REMEMBERED = 20


#: The API subscribes a new commitment to its buses before it answers the create; a
#: commitment still waiting this much later subscribes itself again (a timer), in case
#: the API's node died in between (its creator then got no answer, so no event it sent
#: was promised to reach it). Not at once: that would only repeat the API's subscribe
#: on the bus's serialized mailbox in the middle of a burst of creations, and most
#: commitments waiting for an event are done before (the timer goes with them).
SUBSCRIBE_BACKSTOP_SECONDS = 30.0

#: How long a GET of a retired commitment still says it was retired (then: plain 404).
TOMBSTONE_MS = 7 * 86_400_000


def bus_name(principal: str, event_type: str) -> str:
    digest = hashlib.sha256(event_type.encode()).hexdigest()[:24]
    return f"cmbus/{principal}-{digest}"


def leaves(trigger: dict[str, Any], path: str = "r") -> list[tuple[str, dict[str, Any]]]:
    if trigger["type"] == "compound":
        out: list[tuple[str, dict[str, Any]]] = []
        for i, child in enumerate(trigger["triggers"]):
            out.extend(leaves(child, f"{path}.{i}"))
        return out
    return [(path, trigger)]


def event_types(trigger: dict[str, Any]) -> set[str]:
    types = set()
    for _, leaf in leaves(trigger):
        if leaf["type"] in ("webhook", "heartbeat"):
            types.add(leaf["event_type"])
        elif leaf["type"] == "tool_complete":
            types.add(TOOL_EVENT)
    return types


def creation(spec: CommitmentCreate, pending_quota: int | None = None) -> dict[str, Any]:
    """A checked creation as :meth:`Commitment.create` takes it: JSON, with the due time
    of every ``time_after`` leaf at a timestamp resolved (one after a delay is fixed by
    the actor, at its transaction's time). The API sends this, so the actor does not
    validate the creation a second time. With ``pending_quota`` (the principal's), the
    creation is refused when it is reached (on a single Redis: by the commit)."""
    out = spec.model_dump(mode="json")  # (one call: a third cheaper than one a field)
    del out["expires_at"]
    models = dict(_model_leaves(spec.trigger))
    for path, leaf in leaves(out["trigger"]):
        model = models[path]
        if isinstance(model, TimeAfter) and model.timestamp is not None:
            leaf["due_ms"] = model.due_ms(0)
    out["expires_ms"] = spec.expires_ms()
    out["pending_quota"] = pending_quota
    return out


def _model_leaves(trigger: Any, path: str = "r") -> list[tuple[str, Any]]:
    """:func:`leaves` of a trigger model (the same paths)."""
    if isinstance(trigger, Compound):
        out: list[tuple[str, Any]] = []
        for i, child in enumerate(trigger.triggers):
            out.extend(_model_leaves(child, f"{path}.{i}"))
        return out
    return [(path, trigger)]


def split_commitment(name: ActorName) -> tuple[str, str]:
    """``commitment/PRINCIPAL-cm_...`` -> (principal, commitment id)."""
    principal, _, cid = name.id.partition("-")
    return principal, cid


class Commitment(CA):
    """One commitment. Every method is internal: clients reach commitments only
    through ``/v1/commitments``, which acts for the authenticated principal, and the
    principal a commitment belongs to is read from its own name, never from input.

    The methods are ``async def`` though none awaits: they never block, so they run
    on the node's event loop instead of taking a worker thread per message."""

    state_version = "1.0.0"
    #: A commitment is busy when created and when it fires, usually far apart: kept in
    #: memory meanwhile, a hundred thousand waiting ones would cost a node ~800 MB. One
    #: that finishes, or is armed to fire later than this, leaves memory at once.
    idle_seconds = 30.0

    #: The bus whose fan-out is delivering the event being handled (it prunes this
    #: commitment from its subscribers when the reply says it no longer waits).
    _pruned_by: str | None = None

    # -- creation and reads ------------------------------------------------------------

    @internal
    async def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Idempotent: a second create of the same commitment returns it unchanged.
        ``spec`` is :func:`creation` of a checked :class:`CommitmentCreate` (what the
        API sends), or the JSON a client wrote, which is checked here. On a single
        Redis the commit refuses a ``dedup_key`` bound to another commitment: the
        error's data names it (``dedup_of``), and nothing is written."""
        if self.state.get("id"):
            return self.view()
        principal, cid = split_commitment(self.name)
        if self.name.owner is None or not cid:
            raise AppError(f"{self.name} is not a commitment name (commitment/PRINCIPAL-ID)")
        if "expires_ms" not in spec:  # not prepared by the API (no such field in the JSON)
            spec = creation(CommitmentCreate.model_validate(spec))
        created = self.now_ms
        trigger = spec["trigger"]
        for _, leaf in leaves(trigger):  # fixed now: a retry of create must not move it
            if leaf["type"] == "time_after" and "due_ms" not in leaf:
                leaf["due_ms"] = created + int(leaf["delay_seconds"] * 1000)
        self.state.update(
            id=cid,
            principal=principal,
            status="pending",
            trigger=trigger,
            obligation=spec["obligation"],
            retry_policy=spec["retry_policy"],
            expires_ms=spec["expires_ms"],
            dedup_key=spec["dedup_key"],
            metadata=spec["metadata"],
            created_ms=created,
            updated_ms=created,
            due_ms=trigger.get("due_ms"),
            fired_ms=None,
            fired_by=None,
            progress={},
            attempts=[],
            error=None,
            rev=1,
            transitions=[{"status": "pending", "at_ms": created}],
        )
        if trigger["type"] == "time_after":  # armed: the delivery alone keeps the time
            wait_ms = max(0, trigger["due_ms"] - created)
            self.state["armed"] = self._deliver(
                fired_by=self._fired_by_time(), delay_seconds=wait_ms / 1000
            )
            if wait_ms > (self.idle_seconds or 0) * 1000:
                # Nothing runs here before the delivery's outcome, and it would leave
                # memory before then anyway: at once, then (a burst of creations no
                # longer holds a cell each for idle_seconds).
                self.passivate()
        # (the timers plugin only where there is a timer: an armed delivery needs none)
        for path, leaf in leaves(trigger):
            if leaf["type"] == "time_after" and "armed" not in self.state:
                self.plugins.timers.at(leaf["due_ms"] / 1000, "on_time", path, name=f"t:{path}")
            elif leaf["type"] == "heartbeat":
                self.plugins.timers.after(
                    leaf["interval_seconds"], "on_time", path, name=f"t:{path}"
                )
        if self.state["expires_ms"] is not None:
            self.plugins.timers.at(self.state["expires_ms"] / 1000, "expire", name="expire")
        if event_types(trigger):  # the backstop of the API's own subscribe
            self.plugins.timers.after(
                SUBSCRIBE_BACKSTOP_SECONDS, "subscribe_again", name="subscribe"
            )
        self.plugins.commitments.index(
            principal,
            summary(self.state),
            bind=spec["dedup_key"],
            pending_quota=spec.get("pending_quota"),
        )
        return self.view()

    @internal
    async def subscribe_again(self) -> None:
        """The backstop (a timer, cancelled with the others once it stops waiting)."""
        if self.state.get("status") == "pending":
            for event_type in event_types(self.state["trigger"]):
                bus = bus_name(self.state["principal"], event_type)
                self.plugins.send.tell(bus, "subscribe", str(self.name))

    @internal
    async def get(self) -> dict[str, Any]:
        if not self.state.get("id"):
            raise NotFoundError("no such commitment")  # rolled back: nothing is written
        return self.view()

    @internal
    def view(self) -> dict[str, Any]:
        """The commitment as the API shows it; while triggered, with ``delivery``: the
        ledger entry of its delivery under way, whose attempts so far and next attempt
        (``next_attempt_ms``) the API adds (the commitment itself learns the attempts
        with the outcome)."""
        s = self.state
        status = self._status()
        view = {
            "status": status,
            **{
                k: s.get(k)
                for k in (
                    "id",
                    "trigger",
                    "obligation",
                    "retry_policy",
                    "expires_ms",
                    "dedup_key",
                    "metadata",
                    "created_ms",
                    "updated_ms",
                    "due_ms",
                    "fired_ms",
                    "fired_by",
                    "progress",
                    "attempts",
                    "error",
                    "transitions",
                    "rev",
                    "retires_ms",
                )
            },
            "next_attempt_ms": None,
        }
        if status == "triggered":
            view["delivery"] = s.get("delivery") or s.get("armed")
            if view["fired_by"] is None:  # armed, and due: its time fired it
                view["fired_by"] = self._fired_by_time()
        return view

    def _fired_by_time(self) -> dict[str, Any]:
        """What fired a time-only commitment (as ``on_time`` records it)."""
        return {"kind": "time", "path": "r", "due_ms": self.state["due_ms"]}

    def _status(self) -> str | None:
        """The status; an armed delivery makes a pending commitment triggered from its
        due time on (the delivery may begin any moment, on any node)."""
        s = self.state
        if s.get("armed") and s["status"] == "pending" and self.now_ms >= s["due_ms"]:
            return "triggered"
        return s.get("status")

    # -- transitions -----------------------------------------------------------------------

    @internal
    async def cancel(self) -> dict[str, Any]:
        """Pending: it will never fire. Failed (a dead letter): it will not be re-driven."""
        self._require(("pending", "failed"), "cancel")
        self._finish_waiting("cancelled")
        return self.view()

    @internal
    async def reschedule(self, when: dict[str, Any]) -> dict[str, Any]:
        """A pending commitment whose trigger is one ``time_after`` fires at another time
        (``when``: :class:`Reschedule` as JSON, with a timestamp's ``due_ms``; a delay
        counts from this transaction), sooner or later; its ``dedup_key``, id and
        idempotency key stay. The armed delivery is taken back and armed again in one
        commit, which is refused (409) if it began meanwhile, on any node: it is
        delivered at the old time or the new one, never both."""
        self._require("pending", "reschedule")
        s = self.state
        if s["trigger"]["type"] != "time_after":
            raise AppError(
                "only a commitment whose trigger is one time_after can be rescheduled",
                {"trigger_type": s["trigger"]["type"]},
            )
        now = self.now_ms
        due = when.get("due_ms")
        if due is None:
            due = now + int(when["delay_seconds"] * 1000)
        if s["expires_ms"] is not None and due >= s["expires_ms"]:
            raise BadRequestError(
                f"the new due time {iso(due)} is not before expires_at "
                f"{iso(s['expires_ms'])}: the commitment could never fire"
            )
        armed = s.pop("armed", None)
        if armed:
            began = "cannot reschedule a commitment that is triggered: its delivery began"
            self.plugins.commitments.withdraw(armed, AppError(began, {"status": "triggered"}))
        else:  # (created before deliveries were armed: its timer keeps the time)
            self.plugins.timers.cancel("t:r")
        s["trigger"] = {"type": "time_after", **when, "due_ms": due}
        s["due_ms"] = due
        s["updated_ms"] = now
        s["rev"] += 1
        wait_ms = max(0, due - now)
        if armed:
            s["armed"] = self._deliver(fired_by=self._fired_by_time(), delay_seconds=wait_ms / 1000)
        else:
            self.plugins.timers.at(due / 1000, "on_time", "r", name="t:r")
        if wait_ms > (self.idle_seconds or 0) * 1000:
            self.passivate()
        self._index()
        return self.view()

    @internal
    async def expire(self) -> None:
        if self._status() == "pending":
            self._finish_waiting("expired")

    @internal
    async def retry(self) -> dict[str, Any]:
        """Re-drive a dead letter: deliver again, with the same idempotency key."""
        self._require("failed", "retry")
        self._move("triggered")
        self.state["error"] = None
        self.state["delivery"] = self._deliver()
        return self.view()

    @internal
    async def on_time(self, path: str) -> None:
        if self.state.get("status") != "pending":
            return
        firing = self.plugins.timers.firing
        due_ms = int(firing.due_at * 1000) if firing else self.now_ms
        self._satisfy(path, {"kind": "time", "path": path, "due_ms": due_ms})

    @internal
    async def on_event(self, event: dict[str, Any]) -> bool:
        """An event from the principal's bus; True while this commitment still waits
        for events of that type (False: the bus may forget it; it does not unsubscribe
        from that bus itself when the event ends its wait). An event taken once is
        ignored if it comes again (a fan-out that restarted)."""
        if self.state.get("status") != "pending":
            return False
        event_id = event.get("event_id")
        taken = self.state.get("events_taken", [])
        if event_id is not None and event_id in taken:
            return True
        self._pruned_by = bus_name(self.state["principal"], str(event.get("event_type")))
        try:
            hit = self._take_event(event)
        finally:
            self._pruned_by = None
        if hit and event_id is not None:
            self.state["events_taken"] = [*taken, event_id][-EVENTS_REMEMBERED:]
        return bool(self.state["status"] == "pending")

    def _take_event(self, event: dict[str, Any]) -> bool:
        """Apply ``event`` to every leaf it matches; True if any."""
        hit = False
        for path, leaf in leaves(self.state["trigger"]):
            if not self._matches(leaf, event):
                continue
            hit = True
            if leaf["type"] == "heartbeat":  # a sign of life: restart the silence timer
                self.plugins.timers.after(
                    leaf["interval_seconds"], "on_time", path, name=f"t:{path}"
                )
            else:
                self._satisfy(
                    path,
                    {
                        "kind": "event",
                        "path": path,
                        "event": event,
                        "due_ms": event.get("received_ms", self.now_ms),
                    },
                )
            if self.state["status"] != "pending":
                break
        return hit

    @internal
    async def on_delivery(self, result: dict[str, Any]) -> None:
        """The outbox's final word on the delivery: every attempt, and the outcome. An
        armed delivery's word also says when it fired."""
        s = self.state
        s.pop("delivery", None)
        if s.get("armed") and s["status"] == "pending":
            del s["armed"]
            fired = (result.get("value") or {}).get("fired_ms") or self.now_ms
            s["fired_ms"] = fired
            s["fired_by"] = self._fired_by_time()
            s["progress"]["r"] = {"at_ms": fired, **s["fired_by"]}
            self._stop_waiting()
            self._move("triggered", at_ms=fired, index=False)  # the outcome's move indexes
        if s.get("status") != "triggered":
            return
        s["attempts"] = with_attempts(s["attempts"], result.get("history", []))
        if result.get("ok"):
            self._move("fulfilled")
        else:
            self.state["error"] = result.get("error") or "delivery failed"
            self._move("failed")

    # -- internals -------------------------------------------------------------------------

    def _require(self, status: str | tuple[str, ...], action: str) -> None:
        current = self._status()
        if current is None:
            raise NotFoundError("no such commitment")
        if current not in ((status,) if isinstance(status, str) else status):
            raise AppError(f"cannot {action} a commitment that is {current}", {"status": current})

    @staticmethod
    def _matches(leaf: dict[str, Any], event: dict[str, Any]) -> bool:
        etype, payload = event.get("event_type"), event.get("payload") or {}
        if leaf["type"] in ("webhook", "heartbeat"):
            return bool(etype == leaf["event_type"] and filters.matches(leaf["filters"], payload))
        if leaf["type"] == "tool_complete":
            return bool(
                etype == TOOL_EVENT
                and payload.get("tool_id") == leaf["tool_id"]
                and (leaf.get("outcome") is None or payload.get("outcome") == leaf["outcome"])
            )
        return False

    def _satisfy(self, path: str, info: dict[str, Any]) -> None:
        now = self.now_ms
        self.state["progress"][path] = {"at_ms": now, **_brief(info)}
        if self._satisfied(self.state["trigger"], "r", now):
            self._fire(info)

    def _satisfied(self, trigger: dict[str, Any], path: str, now: int) -> bool:
        if trigger["type"] != "compound":
            return path in self.state["progress"]
        kids = [(f"{path}.{i}", t) for i, t in enumerate(trigger["triggers"])]
        if trigger["operator"] == "any":
            return any(self._satisfied(t, p, now) for p, t in kids)
        window = trigger.get("window_seconds")
        if window:  # satisfactions older than the window lapse
            cutoff = now - int(window * 1000)
            for p, leaf in leaves(trigger, path):
                got = self.state["progress"].get(p)
                if got and got["at_ms"] < cutoff and leaf["type"] != "time_after":
                    del self.state["progress"][p]
        return all(self._satisfied(t, p, now) for p, t in kids)

    def _fire(self, info: dict[str, Any]) -> None:
        now = self.now_ms
        self.state["fired_ms"] = now
        self.state["fired_by"] = _brief(info)
        self.state["due_ms"] = info.get("due_ms", now)
        self._stop_waiting()
        self._move("triggered")
        self.state["delivery"] = self._deliver()

    def _deliver(self, fired_by: dict[str, Any] | None = None, delay_seconds: float = 0) -> str:
        """The delivery, now; or with ``fired_by``, armed: performed at its due time
        without another transaction of this commitment (a time-only commitment)."""
        s = self.state
        entry_id: str = self.plugins.commitments.deliver(
            commitment_id=s["id"],
            principal=s["principal"],
            obligation=s["obligation"],
            trigger=fired_by or s["fired_by"],
            due_ms=s["due_ms"],
            fired_ms=None if fired_by else s["fired_ms"],
            retry=s["retry_policy"],
            on_result="on_delivery",
            delay_seconds=delay_seconds,
        )
        return entry_id

    def _finish_waiting(self, status: str) -> None:
        armed = self.state.pop("armed", None)
        if armed:  # this commit is refused if the delivery began meanwhile, on any node
            verb = {"cancelled": "cancel", "expired": "expire"}[status]
            began = f"cannot {verb} a commitment that is triggered: its delivery began"
            self.plugins.commitments.withdraw(armed, AppError(began, {"status": "triggered"}))
        self._stop_waiting()
        self._move(status)

    def _stop_waiting(self) -> None:
        timers = self.plugins.timers
        for name in list(timers.pending()):
            timers.cancel(name)
        for event_type in event_types(self.state["trigger"]):
            bus = bus_name(self.state["principal"], event_type)
            if bus != self._pruned_by:  # that bus's fan-out forgets this commitment
                self.plugins.send.tell(bus, "unsubscribe", str(self.name))

    def _move(self, status: str, at_ms: int | None = None, index: bool = True) -> None:
        now = self.now_ms
        self.state["status"] = status
        self.state["updated_ms"] = now
        self.state["rev"] += 1
        self.state["transitions"].append({"status": status, "at_ms": at_ms or now})
        if status in TERMINAL:
            keep = self.plugins.commitments.retention_seconds
            self.state["retires_ms"] = now + int(keep * 1000)
            self.plugins.timers.after(keep, "retire", name="retire")
            self.passivate()  # nothing to do until a read or the retire timer
        else:
            self.state.pop("retires_ms", None)  # running again (a retry)
        if index:
            self._index()

    @internal
    async def retire(self) -> None:
        """Retention: delete this finished commitment and everything it owns, in one
        commit (checkpoint, timers, cached replies, notifications, the index rows and
        the dedup_key binding, leaving a tombstone; on Redis Cluster the index's part
        follows through the outbox)."""
        s = self.state
        if s.get("status") not in TERMINAL:
            return
        s["rev"] += 1
        gone = {**summary(s), "status": "retired", "updated_ms": self.now_ms}
        self.plugins.commitments.index(s["principal"], gone, tombstone_ms=TOMBSTONE_MS)
        self.delete_self()

    def _index(self) -> None:
        s = self.state
        self.plugins.commitments.index(s["principal"], summary(s))


def with_attempts(attempts: list[dict[str, Any]], history: list[dict[str, Any]]) -> list[Any]:
    """``attempts`` followed by those of a delivery's ``history`` (as its ledger entry
    keeps it), numbered on from them (a re-driven delivery's entry counts from 1
    again); the last ``MAX_ATTEMPTS_KEPT``."""
    offset = len(attempts)
    rows = [
        {
            "attempt": offset + int(h.get("attempt", 0)),
            "at_ms": h.get("at_ms"),
            "status_code": h.get("status_code"),
            "error": h.get("error"),
            "duration_ms": h.get("duration_ms"),
        }
        for h in history
    ]
    return [*attempts, *rows][-MAX_ATTEMPTS_KEPT:]


def summary(state: dict[str, Any]) -> dict[str, Any]:
    """What the listing shows of a commitment (kept in the index)."""
    return {
        "id": state["id"],
        "status": state["status"],
        "trigger_type": state["trigger"]["type"],
        "target": state["obligation"]["target"],
        "dedup_key": state.get("dedup_key"),
        "created_ms": state["created_ms"],
        "updated_ms": state["updated_ms"],
        "due_ms": state.get("due_ms"),
        "attempts": len(state.get("attempts", [])),
        "rev": state["rev"],
        "ended_ms": state["updated_ms"] if state["status"] in TERMINAL else None,
        "retires_ms": state.get("retires_ms") if state["status"] in TERMINAL else None,
        # for the console's search by metadata (absent when empty: no bytes spent)
        **({"metadata": state["metadata"]} if state.get("metadata") else {}),
    }


def _brief(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k in ("kind", "path", "event", "due_ms")}


class EventBus(CA):
    """Subscribers and recent event keys of one (principal, event type).

    The subscribers are the bus's member set (``self.plugins.members``): a subscribe
    or unsubscribe writes one member, however many there are. A publish commits the
    event once, in one ``cmfanout`` outbox entry that hands it to every subscriber.
    """

    state_version = "2.0.0"

    def init(self) -> None:
        self.state.update(recent_keys=[], published=0)

    def upgrade(self, old: str, new: str) -> None:
        """1.x kept the subscribers in the state, rewritten whole by every change."""
        for commitment in self.state.pop("subscribers", {}):
            self.plugins.members.add(commitment)

    def _own(self, commitment: str) -> str:
        """Only a commitment of this bus's own principal may be (un)subscribed."""
        name = ActorName.parse(commitment)
        if name.type != "commitment" or name.owner != self.name.owner:
            raise AppError(f"{commitment} is not a commitment of {self.name.owner!r}")
        return commitment

    @internal
    async def subscribe(self, commitment: str) -> int:
        """Idempotent; a repeat writes nothing (the member check and count share one
        round trip)."""
        members = self.plugins.members
        known, count = await asyncio.gather(
            members.contains(self._own(commitment)), members.count()
        )
        if not known:
            if count >= MAX_SUBSCRIBERS:
                raise AppError(f"at most {MAX_SUBSCRIBERS} pending commitments per event type")
            members.add(commitment)
            count += 1
        return int(count)

    @internal
    async def unsubscribe(self, commitment: str) -> None:
        self.plugins.members.remove(self._own(commitment))

    @internal
    async def forget(self, commitments: list[str]) -> None:
        """The subscribers a fan-out found no longer waiting: one commit for a page."""
        for commitment in commitments:
            self.plugins.members.remove(self._own(commitment))

    @internal
    async def publish(self, event: dict[str, Any]) -> dict[str, Any]:
        """Commit the event and its fan-out; a repeated ``event_key`` does nothing."""
        key = event.get("event_key")
        if key is not None and key in self.state["recent_keys"]:
            return {"duplicate": True, "delivered_to": 0}
        if key is not None:
            self.state["recent_keys"] = [*self.state["recent_keys"], key][-RECENT_EVENT_KEYS:]
        self.state["published"] += 1
        subscribers = int(await self.plugins.members.count())
        if subscribers:
            self.plugins.commitments.fanout(event)
        return {"duplicate": False, "delivered_to": subscribers}
