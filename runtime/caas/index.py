"""The commitments index: listing by status, counts, and ``dedup_key`` lookups.

Per principal, under the hash tag ``{cm:PRINCIPAL}`` (one slot on Redis Cluster):

=========================  ======  ================================================
key                        type    content
=========================  ======  ================================================
P:{cm:p}:all               zset    commitment id -> created (ms)
P:{cm:p}:s:STATUS          zset    commitment id -> created (ms), one per status
P:{cm:p}:sum               hash    commitment id -> summary JSON (with ``rev``)
P:{cm:p}:count             hash    status -> number of commitments
P:{cm:p}:dedup             hash    dedup_key -> commitment id
P:{cm:p}:ended             zset    finished commitment id -> when it is retired (ms)
P:{cm:p}:gone:ID           string  a retired commitment's tombstone (expires)
P:{cm:p}:m:N:KEY=VALUE     zset    commitment id -> created (ms), for each indexed
                                   metadata key (N: the key's length)
P:{cm:p}:mready            hash    indexed metadata key -> generation built
P:principals               set     principals that have commitments (for metrics)
P:cm:mindex                hash    indexed metadata key -> its generation
P:cm:mindex:gen            string  the last generation given
=========================  ======  ================================================

The commitment actor is the source of truth. On a single Redis its summary moves
with it: every transition's commit applies it too (the commit step ``cmindex``), so
the index is exact at every moment, and a creation's commit also binds its
``dedup_key`` and checks the pending quota, refusing the whole creation if the key
is bound to another commitment or the quota is reached. On Redis Cluster the index
lives in a slot of its own: the summary then travels through the outbox after every
transition (at least once), and the API binds keys and checks the quota before it
creates. Either way ``lua/cmindex.lua`` applies a summary only when its ``rev`` is
newer than the stored one, so repeats and reordering are harmless and the index
converges on the actor's state. The last summary of a commitment, committed in the
transaction that deletes it (retention), says ``retired``: the index then removes
every row of it and leaves a tombstone for a while, so that a late summary cannot
bring it back and a GET can say it was retired.

**Metadata.** A search by metadata is a scan of the principal's summaries, unless
the key is listed in ``indexed_metadata``: a new commitment then joins the index of
each listed key its metadata has (``P:{cm:p}:m:...``, in the same step as its
summary), and a search by that key reads it, exact and a page at a time. The index
of a key listed after commitments had it is built from their summaries, per
principal, by the first search that needs it (which scans meanwhile); it is trusted
once built for the key's current *generation*. A node that starts without a key
listed ends its generation (the node then indexes nothing for it, so the index can
no longer be complete); listed again, the key gets a new generation, whose index is
built afresh. A retired commitment leaves every metadata index it may be in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from functools import partial
from typing import Any

import orjson
import redis

from troth.caas.models import STATUSES
from troth.core.batcher import Batcher, Command
from troth.core.errors import AppError, BadRequestError, QuotaExceeded
from troth.core.keys import KeySpace
from troth.core.records import CommitStep
from troth.core.scripts import Script, load_lua

log = logging.getLogger(__name__)

#: Principals whose index keys are kept made (a bound: principals come from outside).
STEP_KEYS_CACHED = 4096

#: Fields of a summary that the index leaves out while they are null, as it leaves
#: out the id (the row's hash field): most rows are pending commitments, for which
#: they are all null, and the rows are a quarter of what one keeps in Redis.
_NULLABLE = ("dedup_key", "due_ms", "ended_ms", "retires_ms")


#: Metadata keys one deployment may index (each costs a key a value a principal).
MAX_INDEXED_KEYS = 16
#: Metadata values longer than this (as text) are not indexed: searched by a scan.
MAX_INDEXED_TEXT = 200
#: Metadata indexes built at once on one node (more searches scan meanwhile).
MAX_BUILDS = 4
#: Summaries one build reads a round trip.
BUILD_CHUNK = 500
#: A build logs its progress every so many summaries read.
BUILD_PROGRESS = 100_000


def metadata_text(value: Any) -> str | None:
    """A metadata value as a search compares it: a string as it is, a number or a
    boolean as JSON writes it (``true``, ``10``, ``1.5``); None for what a search never
    matches (null, lists, objects)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return orjson.dumps(value).decode()
    return None


def _stored(summary: dict[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in summary.items() if v is not None and k != "id"})


def _row(cid: str, raw: bytes) -> dict[str, Any]:
    """A stored summary as listings show it (rows stored whole by earlier versions
    read the same)."""
    row: dict[str, Any] = {"id": cid, **orjson.loads(raw)}
    for name in _NULLABLE:
        row.setdefault(name, None)
    return row


class CommitmentIndex:
    """Reads are plain redis-py calls (the API runs them off the loop); :meth:`apply`
    runs on the node's loop and shares the engine's batched round trips, so the
    index updates of many commitments travel together. A reader (``troth status``,
    the metrics) needs no batcher."""

    def __init__(
        self,
        client: redis.Redis,
        keys: KeySpace,
        batcher: Batcher | None = None,
        indexed_metadata: Collection[str] = (),
    ) -> None:
        self.client = client
        self.batcher = batcher
        self.prefix = keys.prefix
        #: The metadata keys whose values are indexed (``indexed_metadata``).
        self.indexed = frozenset(indexed_metadata)
        self._principals = f"{self.prefix}:principals"
        self._generations = f"{self.prefix}:cm:mindex"
        self._apply = Script(f"{FUNCTIONS}\nreturn cmindex_apply(KEYS, ARGV)")
        self._backfill = Script(load_lua("cmbackfill.lua", "troth.caas"))
        self._builds: set[tuple[str, str]] = set()  # (principal, key) being built here
        self._builds_lock = threading.Lock()
        self._closed = threading.Event()  # the node stops: builds stop at their next step
        self._known: set[str] = set()  # principals already in P:principals
        self._step_key_cache: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def _writer(self) -> Batcher:
        if self.batcher is None:
            raise RuntimeError("updating the commitments index needs the node's batcher")
        return self.batcher

    def _k(self, principal: str, what: str) -> str:
        return f"{self.prefix}:{{cm:{principal}}}:{what}"

    def _step_keys(self, principal: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The keys of ``lua/cmindex.lua`` that are the principal's own (those before
        and after the commitment's tombstone), made once per principal: every change
        of every commitment names them."""
        known = self._step_key_cache.get(principal)
        if known is None:
            before = tuple(self._k(principal, w) for w in ("all", "sum", "count", "dedup", "ended"))
            after = tuple(self._k(principal, f"s:{status}") for status in STATUSES)
            if len(self._step_key_cache) >= STEP_KEYS_CACHED:
                self._step_key_cache.clear()
            known = self._step_key_cache[principal] = (before, after)
        return known

    async def apply(self, principal: str, summary: dict[str, Any], tombstone_ms: int = 0) -> bool:
        """Apply ``summary`` unless the index holds a newer one (``rev``); True if
        applied."""
        return (await self.apply_many(principal, [summary], tombstone_ms))[0]

    async def apply_many(
        self, principal: str, summaries: list[dict[str, Any]], tombstone_ms: int = 0
    ) -> list[bool]:
        """:meth:`apply` for several commitments of ``principal``, in one request."""
        new_principal = principal not in self._known

        def add(commands: list[Command]) -> None:
            for summary in summaries:
                self._apply.queue(commands, *self._call(principal, summary, tombstone_ms))
            if new_principal:  # another slot than the principal's index on a cluster
                commands.append(("SADD", self._principals, principal))

        count = len(summaries) + (1 if new_principal else 0)
        replies = await self._writer().results(add, count, self._apply)
        self._known.add(principal)
        return [bool(r) for r in replies[: len(summaries)]]

    def step(
        self,
        principal: str,
        summary: dict[str, Any],
        tombstone_ms: int = 0,
        bind: str | None = None,
        pending_quota: int | None = None,
    ) -> CommitStep:
        """:meth:`apply` as a step of the commitment's commit (a single Redis only). For
        a creation: ``bind`` its ``dedup_key`` to it, and refuse the commit if the key is
        bound to another commitment (``AppError`` whose data names it: ``dedup_of``) or
        if the principal has ``pending_quota`` pending commitments (``QuotaExceeded``)."""
        keys, args = self._call(principal, summary, tombstone_ms, bind, pending_quota, True)
        return CommitStep("cmindex", keys, args, partial(_refusal, principal, bind, pending_quota))

    def _call(
        self,
        principal: str,
        summary: dict[str, Any],
        tombstone_ms: int,
        bind: str | None = None,
        pending_quota: int | None = None,
        listed: bool = False,
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of ``lua/cmindex.lua``; with ``listed``, a new row also
        adds the principal to the set of principals (a key of another slot)."""
        cid = summary["id"]
        before, after = self._step_keys(principal)
        keys = [*before, self._k(principal, f"gone:{cid}"), *after]
        if "metadata" in summary and (self.indexed or summary["status"] == "retired"):
            keys += self._metadata_keys(principal, summary)
        quota = "" if pending_quota is None else pending_quota
        args = [cid, summary["rev"], _stored(summary), tombstone_ms, bind or "", quota]
        if listed:
            keys.append(self._principals)
        args.append(principal if listed else "")
        return keys, [*args, *STATUSES]

    def _metadata_key(self, principal: str, key: str, value: Any) -> str | None:
        """The index of ``key`` holding commitments whose ``key`` is ``value``; None for a
        value no index holds (see :func:`metadata_text`, ``MAX_INDEXED_TEXT``)."""
        text = metadata_text(value)
        if text is None or len(text) > MAX_INDEXED_TEXT:
            return None
        return self._k(principal, f"m:{len(key)}:{key}={text}")

    def _metadata_keys(self, principal: str, summary: dict[str, Any]) -> list[str]:
        """The metadata indexes a commitment joins: those of the indexed keys; once
        retired, those of every key (one listed earlier may have indexed it)."""
        every = summary["status"] == "retired"
        found = (
            self._metadata_key(principal, key, value)
            for key, value in summary["metadata"].items()
            if every or key in self.indexed
        )
        return [k for k in found if k is not None]

    def reconcile_metadata(self) -> None:
        """At a node's start: give each newly indexed metadata key a generation, and
        end that of each key no longer indexed (the node will not index it, so its
        index cannot be trusted again). Every node should list the same keys."""
        known = {k.decode() for k in self.client.hkeys(self._generations)}
        for key in sorted(known - self.indexed):
            self.client.hdel(self._generations, key)
            log.info("metadata key %r is no longer indexed", key)
        for key in sorted(self.indexed - known):
            generation = self.client.incr(f"{self._generations}:gen")
            if self.client.hsetnx(self._generations, key, generation):
                log.info("metadata key %r indexed (generation %d)", key, generation)

    def _indexed(self, principal: str, key: str, value: str) -> bool:
        """Whether a search by ``key=value`` may read the index: the key is indexed and
        its index for this principal was built for the key's current generation (if
        not, the build starts, and this search scans)."""
        if key not in self.indexed or len(value) > MAX_INDEXED_TEXT:
            return False
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(self._generations, key)
        pipe.hget(self._k(principal, "mready"), key)
        generation, ready = pipe.execute()
        if generation is None:  # a node without the key started since: scan
            return False
        if ready == generation:
            return True
        self._build_soon(principal, key, generation.decode())
        return False

    def _build_soon(self, principal: str, key: str, generation: str) -> None:
        with self._builds_lock:
            if (principal, key) in self._builds or len(self._builds) >= MAX_BUILDS:
                return
            self._builds.add((principal, key))
        threading.Thread(
            target=self._build,
            args=(principal, key, generation),
            name=f"troth-metadata-index-{key}",
            daemon=True,
        ).start()

    def _build(self, principal: str, key: str, generation: str) -> None:
        """Add the principal's commitments that have ``key`` to its index, and mark the
        index built for ``generation``. New commitments join it meanwhile by
        themselves; one retired meanwhile is left out (``lua/cmbackfill.lua``)."""
        summaries = self._k(principal, "sum")
        added = seen = 0
        try:
            chunk: list[tuple[str, int, str]] = []
            for cid, raw in self.client.hscan_iter(summaries, count=BUILD_CHUNK):
                if self._closed.is_set():
                    return  # (not marked built: the next search starts again)
                seen += 1
                if seen % BUILD_PROGRESS == 0:
                    log.info("metadata index of %r for %s: %d read", key, principal, seen)
                row = orjson.loads(raw)
                zset = self._metadata_key(principal, key, (row.get("metadata") or {}).get(key))
                if zset is not None:
                    chunk.append((zset, row["created_ms"], cid))
                if len(chunk) >= BUILD_CHUNK:
                    added += self._add_rows(summaries, chunk)
                    chunk = []
            added += self._add_rows(summaries, chunk)
            if (self.client.hget(self._generations, key) or b"").decode() == generation:
                self.client.hset(self._k(principal, "mready"), key, generation)
            log.info(
                "metadata index of %r for principal %s built: %d of %d commitments added",
                key,
                principal,
                added,
                seen,
            )
        except redis.RedisError as exc:  # the next search starts it again
            log.warning("building the metadata index of %r for %s failed: %s", key, principal, exc)
        finally:
            with self._builds_lock:
                self._builds.discard((principal, key))

    def close(self) -> None:
        """Stop the builds under way (the node stops)."""
        self._closed.set()

    def _add_rows(self, summaries: str, rows: list[tuple[str, int, str]]) -> int:
        if not rows:
            return 0
        keys = [summaries, *(zset for zset, _, _ in rows)]
        args = [a for _, created, cid in rows for a in (cid, created)]
        (added,) = self._backfill.run_many(self.client, [(keys, args)])
        return int(added)

    def retired_at(self, principal: str, cid: str) -> int | None:
        """When ``cid`` was retired (ms), while its tombstone lasts."""
        raw = self.client.get(self._k(principal, f"gone:{cid}"))
        return None if raw is None else int(raw)

    def retained(self) -> tuple[int, int | None]:
        """How many finished commitments are kept, over every principal, and when the
        next of them is retired (ms; None if none)."""
        principals = self.principals()
        pipe = self.client.pipeline(transaction=False)
        for p in principals:
            pipe.zcard(self._k(p, "ended"))
            pipe.zrange(self._k(p, "ended"), 0, 0, withscores=True)
        replies = pipe.execute()
        total = sum(int(n) for n in replies[0::2])
        firsts = [int(first[0][1]) for first in replies[1::2] if first]
        return total, min(firsts, default=None)

    def get(self, principal: str, cid: str) -> dict[str, Any] | None:
        raw = self.client.hget(self._k(principal, "sum"), cid)
        return None if raw is None else _row(cid, raw)

    def page(
        self,
        principal: str,
        status: str | None,
        trigger_type: str | None,
        limit: int,
        cursor: str | None,
        within: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first. The cursor is ``created_ms:id`` of the last item returned.
        ``within``: the zset listed instead of the status's (a metadata index)."""
        key = within or self._k(principal, f"s:{status}" if status else "all")
        items: list[dict[str, Any]] = []
        max_score: str = "+inf"
        after: tuple[int, str] | None = None
        if cursor:
            ms, _, cid = cursor.partition(":")
            after = (int(ms), cid)
            max_score = ms
        offset = 0
        while len(items) < limit:
            batch = self.client.zrevrangebyscore(
                key, max_score, "-inf", start=offset, num=limit * 2 + 10, withscores=True
            )
            if not batch:
                return items, None
            offset += len(batch)
            ids = [m.decode() for m, _ in batch]
            sums = self.client.hmget(self._k(principal, "sum"), ids)
            for (member, score), raw in zip(batch, sums, strict=True):
                cid, created = member.decode(), int(score)
                if after and (created, cid) >= after:
                    continue
                if raw is None:
                    continue
                s = _row(cid, raw)
                if (status and s["status"] != status) or (
                    trigger_type and s["trigger_type"] != trigger_type
                ):
                    continue
                items.append(s)
                if len(items) == limit:
                    return items, f"{created}:{cid}"
        return items, None

    def principals(self) -> list[str]:
        return sorted(p.decode() for p in self.client.smembers(self._principals))

    def find(self, principal: str, text: str) -> list[dict[str, Any]]:
        """The commitment whose id or ``dedup_key`` is ``text`` (none, or one)."""
        cid = text
        if not text.startswith("cm_"):
            bound = self.client.hget(self._k(principal, "dedup"), text)
            cid = bound.decode() if bound else ""
        found = self.get(principal, cid) if cid else None
        return [found] if found else []

    def search_metadata(
        self,
        principal: str,
        key: str,
        value: str,
        status: str | None,
        trigger_type: str | None,
        limit: int,
        cursor: str | None,
        budget: int,
    ) -> tuple[list[dict[str, Any]], str | None, bool]:
        """Commitments whose ``metadata[key]`` reads ``value`` (see
        :func:`metadata_text`), newest first: ``(items, next cursor, truncated)``.

        An indexed key (see the module docstring) reads its index, a page at a time.
        Any other is a scan of ``budget`` summaries at most, one page, and
        ``truncated`` says whether it stopped there."""
        if self._indexed(principal, key, value):
            within = self._metadata_key(principal, key, value)
            assert within is not None  # (a string within MAX_INDEXED_TEXT: _indexed)
            items, nxt = self.page(principal, status, trigger_type, limit, cursor, within)
            return items, nxt, False
        if cursor is not None:
            raise BadRequestError(
                f"metadata key {key!r} is not indexed (indexed_metadata): its search has "
                "one page, no cursor"
            )
        found: list[dict[str, Any]] = []
        seen = 0
        for cid, raw in self.client.hscan_iter(self._k(principal, "sum"), count=1000):
            seen += 1
            if seen > budget:
                break
            s = _row(cid.decode(), raw)
            if (
                metadata_text((s.get("metadata") or {}).get(key)) == value
                and (not status or s["status"] == status)
                and (not trigger_type or s["trigger_type"] == trigger_type)
            ):
                found.append(s)
        found.sort(key=lambda s: (s["created_ms"], s["id"]), reverse=True)
        return found[:limit], None, seen > budget

    def counts(self) -> dict[tuple[str, str], int]:
        """(principal, status) -> count, over every principal."""
        principals = self.principals()
        pipe = self.client.pipeline(transaction=False)
        for p in principals:
            pipe.hgetall(self._k(p, "count"))
        out = {}
        for p, counts in zip(principals, pipe.execute(), strict=True):
            for st, n in counts.items():
                out[(p, st.decode())] = int(n)
        return out

    async def admit(
        self, principal: str, creations: list[tuple[str | None, str]]
    ) -> tuple[int, list[str]]:
        """For creations, each ``(dedup_key, new id)``: the principal's pending count, and
        the commitment id each ``dedup_key`` is bound to (binding it to the new id
        unless it is bound already; the new id without a key). One request, sharing
        the engine's round trips."""
        count, dedup = self._k(principal, "count"), self._k(principal, "dedup")
        keyed = [(key, cid) for key, cid in creations if key is not None]

        def add(commands: list[Command]) -> None:
            commands.append(("HGET", count, "pending"))
            for key, cid in keyed:
                commands.append(("HSETNX", dedup, key, cid))
                commands.append(("HGET", dedup, key))

        replies = await self._writer().results(add, 1 + 2 * len(keyed))
        bound = iter(replies[2::2])
        ids = [
            cid if key is None else (next(bound) or cid.encode()).decode() for key, cid in creations
        ]
        return int(replies[0] or 0), ids

    async def pending(self, principal: str) -> int:
        """The principal's pending commitments, as the index counts them."""
        count = self._k(principal, "count")
        (reply,) = await self._writer().results(lambda c: c.append(("HGET", count, "pending")))
        return int(reply or 0)

    async def bound(self, principal: str, dedup_key: str) -> str | None:
        """The commitment id ``dedup_key`` is bound to, if any."""
        dedup = self._k(principal, "dedup")
        (reply,) = await self._writer().results(lambda c: c.append(("HGET", dedup, dedup_key)))
        return reply.decode() if reply else None

    def unbind_dedup(self, principal: str, dedup_key: str, cid: str) -> None:
        """Undo a binding of ``dedup_key`` to ``cid`` whose creation was refused."""
        key = self._k(principal, "dedup")
        if (self.client.hget(key, dedup_key) or b"").decode() == cid:
            self.client.hdel(key, dedup_key)


#: The functions of ``lua/cmindex.lua``: ``cmindex_check`` and ``cmindex_apply``.
FUNCTIONS = load_lua("cmindex.lua", "troth.caas")
#: The commit step ``cmindex`` (see ``CheckpointStore.add_steps``).
COMMIT_STEP = f"{FUNCTIONS}\nSTEPS.cmindex = {{check = cmindex_check, apply = cmindex_apply}}"


def _refusal(principal: str, bind: str | None, quota: int | None, reason: str) -> Exception:
    """The error of a creation whose ``cmindex`` check refused it."""
    what, _, detail = reason.partition(":")
    if what == "dedup":
        return AppError(f"dedup_key {bind!r} names commitment {detail}", {"dedup_of": detail})
    return QuotaExceeded(
        f"principal {principal!r} has {detail} pending commitments; its quota is {quota}", 60
    )
