"""Actor classes used only by the tests."""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from functools import partial
from typing import Any

import troth
from examples.polls.extension import Polls
from troth.core.actor import Plugins
from troth.core.errors import AppError
from troth.core.names import ActorName
from troth.core.plugin import ActorPlugin, PluginContext, PluginFactory
from troth.core.records import CommitOps, CommitStep

#: The latest Probe instance of each actor name, held weakly (is an ended one freed?).
PROBES: weakref.WeakValueDictionary[str, Probe] = weakref.WeakValueDictionary()


class Probe(troth.CA):
    """Records its hooks, timers and webhook results, to observe the runtime."""

    state_version = "1.0.0"

    def __init__(self, name: ActorName, plugins: Plugins) -> None:
        super().__init__(name, plugins)
        PROBES[str(name)] = self

    def init(self) -> None:
        self.state.update(inits=1, resumes=0, fired=[], results=[], value=0)

    def resume(self, checkpoint: troth.Checkpoint) -> None:
        self.state["resumes"] += 1
        self.scratch["resumed_from_seq"] = checkpoint.seq

    def set(self, value: Any) -> Any:
        self.state["value"] = value
        return value

    def get(self) -> dict[str, Any]:
        return dict(self.state)

    def leave(self, then_fail: bool = False) -> None:
        """Delete this actor in this transaction (or not, if it then fails)."""
        self.plugins.session.notify({"bye": True})
        self.delete_self()
        if then_fail:
            raise troth.AppError("changed my mind")

    def rest(self, value: Any, then_fail: bool = False) -> Any:
        """Set ``value`` and leave memory after this commit (or not, if it then fails)."""
        self.state["value"] = value
        self.passivate()
        if then_fail:
            raise troth.AppError("changed my mind")
        return value

    def block(self, seconds: float) -> float:
        """A plain method that blocks its thread (a slow library, time.sleep)."""
        time.sleep(seconds)
        return seconds

    def cpus(self) -> list[int]:
        """The CPUs the thread running a plain method may use."""
        return sorted(os.sched_getaffinity(0))

    async def loop_cpus(self) -> list[int]:
        """The CPUs the node's event loop may use."""
        return sorted(os.sched_getaffinity(0))

    async def nap(self, seconds: float, tag: str) -> list[str]:
        """Read, await, write: the actor takes no other message meanwhile."""
        seen = list(self.state.get("naps", []))
        await asyncio.sleep(seconds)
        naps = self.state["naps"] = [*seen, tag]
        self.plugins.session.notify({"nap": tag})
        return naps

    def wait(self, timeout: float = 1.0, request_id: str | None = None) -> dict[str, Any]:
        """Arguments named like call options: they must arrive as given."""
        self.state["waits"] = self.state.get("waits", 0) + 1
        return {"timeout": timeout, "request_id": request_id, "waits": self.state["waits"]}

    def boom(self) -> None:
        """A bug in an actor: logged with its traceback, answered 500."""
        raise ZeroDivisionError("boom")

    def whoami(self) -> dict[str, Any]:
        return self.caller.to_dict()

    @troth.internal
    def record(self, value: Any) -> dict[str, Any]:
        """An internal method other actors may call: keeps who asked."""
        self.state.setdefault("callers", []).append(self.caller.to_dict())
        return self.caller.to_dict()

    def set_and_return(self, value: Any, bad: str) -> Any:
        """Change the state, then return a reply no JSON client could decode."""
        self.state["value"] = value
        return {
            "nan": float("nan"),
            "bytes": b"raw",
            "surrogate": "\ud800",
            "object": {1, 2},
        }[bad]

    def bump(self) -> None:
        self.state["value"] += 1

    def scratch_seq(self) -> Any:
        return self.scratch.get("resumed_from_seq")

    def after(self, seconds: float, name: str, fail: bool = False) -> str:
        return str(self.plugins.timers.after(seconds, "on_timer", name, fail, name=name))

    def after_then_fail(self, seconds: float, name: str) -> None:
        self.plugins.timers.after(seconds, "on_timer", name, False, name=name)
        raise troth.AppError("rolled back with its timer")

    def every(self, seconds: float, name: str) -> str:
        return str(self.plugins.timers.every(seconds, "on_timer", name, False, name=name))

    def cancel(self, name: str) -> bool:
        return bool(self.plugins.timers.cancel(name))

    def timers(self) -> dict[str, Any]:
        return dict(self.plugins.timers.pending())

    @troth.internal
    def on_timer(self, name: str, fail: bool) -> None:
        firing = self.plugins.timers.firing
        self.state["fired"].append(
            {
                "name": name,
                "lateness": firing.lateness_seconds,
                "missed": firing.missed,
            }
        )
        if fail:
            raise RuntimeError("timer handler failure")

    def hook(
        self,
        url: str,
        payload: Any,
        key: str | None = None,
        idempotent: bool = True,
        retry: dict[str, Any] | None = None,
        fail: bool = False,
    ) -> str:
        entry = self.plugins.http.post(
            url,
            json=payload,
            idempotency_key=key,
            idempotent=idempotent,
            retry=retry,
            on_result="on_result",
            tag="t",
        )
        if fail:
            raise troth.AppError("rolled back")
        return str(entry)

    def headed(self, url: str, headers: dict[str, str]) -> str:
        return str(self.plugins.http.post(url, json={}, headers=headers))

    def nohook(self, url: str, payload: Any, retry: dict[str, Any] | None = None) -> str:
        """A webhook nobody hears back from: a failure ends as a dead letter."""
        return str(self.plugins.http.post(url, json=payload, retry=retry))

    @troth.internal
    def on_result(self, result: dict[str, Any]) -> None:
        self.state["results"].append(result)

    def slow_hook(self, url: str, seconds: float) -> int:
        """Buffer a webhook and a state change, then block: a window to pause the node in."""
        self.plugins.http.post(url, json={"slow": True})
        self.state["value"] += 1
        time.sleep(seconds)
        return int(self.state["value"])

    def tell(self, target: str, value: Any) -> str:
        return str(self.plugins.send.tell(target, "record", value, on_result="on_result"))


class Ledger(troth.CA):
    """Observes group commit: calls queued behind ``hold`` run one after another and
    commit together."""

    state_version = "1.0.0"

    def init(self) -> None:
        self.state["items"] = []

    async def hold(self, seconds: float) -> None:
        """Commits nothing; the calls that arrive meanwhile queue up."""
        await asyncio.sleep(seconds)

    async def add(self, item: Any, fail: bool = False) -> int:
        self.state["items"].append(item)
        self.plugins.session.notify({"added": item})
        if fail:
            raise troth.AppError("refused", {"item": item})
        return len(self.state["items"])

    async def items(self) -> list[Any]:
        items: list[Any] = self.state["items"]
        return items  # the state's own list, on purpose

    async def push(self, item: Any) -> list[Any]:
        items: list[Any] = self.state["items"]
        items.append(item)
        return items  # the state's own list, on purpose, from a call that writes

    async def keep(self, value: Any) -> None:
        self.plugins.remembers.keep(value)

    async def remind(self, name: str) -> None:
        self.plugins.timers.after(60, "add", name, name=name)  # within the due queue's window

    async def forget(self, name: str) -> None:
        self.plugins.timers.cancel(name)

    async def join(self, member: str) -> int:
        self.plugins.members.add(member)
        return int(await self.plugins.members.count())

    async def peek(self) -> int:
        """Uses ``peek``, a plugin that cannot be grouped; returns how often it ran."""
        self.scratch["runs"] = self.scratch.get("runs", 0) + 1
        self.plugins.peek.look()
        self.state["peeked"] = self.state.get("peeked", 0) + 1
        return int(self.scratch["runs"])


class Peek(ActorPlugin):
    """A plugin that does not declare itself groupable (as a third party's would not)."""

    def look(self) -> None:
        self._require_txn()


class PeekFactory(PluginFactory):
    name = "peek"

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Peek(actor, pstate)


class Remembers(ActorPlugin):
    """A plugin with plugin state and a ``resume`` hook, which records each call in
    :data:`RESUMED` (actor, checkpoint seq)."""

    groupable = True

    def keep(self, value: Any) -> None:
        self._require_txn()
        self.pstate["kept"] = value

    def resume(self, checkpoint: troth.Checkpoint) -> None:
        RESUMED.append((str(self.actor), checkpoint.seq))


RESUMED: list[tuple[str, int]] = []


class RemembersFactory(PluginFactory):
    name = "remembers"

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Remembers(actor, pstate)


class Streamer(troth.CA):
    """Not a valid actor: a generator has no single reply to commit."""

    async def events(self) -> Any:
        yield 1


class PollsAgain(Polls):
    """An extension that defines the ``poll`` type a second time (a configuration error)."""

    name = "polls-again"


class Claimant(troth.CA):
    """Claims names that are unique across actors (the ``claims`` plugin)."""

    def claim(self, name: str, then_fail: bool = False) -> list[str]:
        self.state.setdefault("names", []).append(name)
        self.plugins.claims.claim(name)
        if then_fail:
            raise troth.AppError("changed my mind")
        return list(self.state["names"])


class Claims(ActorPlugin):
    """Names unique across actors, in one hash outside any actor's keys: a commit step
    checks that a name is free (or the actor's own) and records it in the same commit."""

    groupable = True

    def __init__(self, actor: ActorName, pstate: dict[str, Any], key: str) -> None:
        super().__init__(actor, pstate)
        self.key = key
        self._names: list[str] = []

    def claim(self, name: str) -> None:
        self._require_txn()
        self._names.append(name)

    def begin(self, txn: Any) -> None:
        super().begin(txn)
        self._names = []

    def prepare(self, ops: CommitOps) -> None:
        for name in self._names:
            refusal = partial(_taken, name)
            ops.steps.append(CommitStep("claim", [self.key], [name, str(self.actor)], refusal))


def _taken(name: str, holder: str) -> AppError:
    return AppError(f"{name!r} is {holder}'s", {"holder": holder})


class ClaimsFactory(PluginFactory):
    name = "claims"
    LUA = """
    STEPS.claim = {
      check = function(keys, args)
        local holder = redis.call('HGET', keys[1], args[1])
        if holder and holder ~= args[2] then return holder end
      end,
      apply = function(keys, args) redis.call('HSET', keys[1], args[1], args[2]) end,
    }
    """

    def __init__(self, context: PluginContext, settings: dict[str, Any]) -> None:
        super().__init__(context, settings)
        self.key = f"{context.keys.prefix}:claims"

    def commit_steps(self) -> dict[str, str]:
        return {"claim": self.LUA}

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Claims(actor, pstate, self.key)
