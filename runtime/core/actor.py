"""``troth.CA``: the class developers subclass.

An actor is a plain Python object whose public methods run one at a time, each
inside a transaction (see :mod:`troth.core.transaction`). It has three kinds of
memory:

* ``self.state``: a dict checkpointed to Redis with every committed message, and
  restored exactly as it was before a message that failed;
* ``self.scratch``: a volatile dict, never checkpointed, lost on passivation or on
  a move to another node (caches, connections);
* ``self.plugins.NAME``: the transactional plugins configured for the node.

Hooks, each run in a transaction of its own like a method:

* ``init()`` once, on first activation (``self.state`` is empty), in the same
  transaction as the actor's first message: if that message fails, ``init`` rolls
  back with it and runs again next time;
* ``resume(checkpoint)`` after every load from a checkpoint;
* ``pulse()`` every ``pulse_seconds`` when that is set (autonomous actors);
* ``upgrade(old, new)`` when the stored ``state_version`` is not compatible with
  the class's (see :mod:`troth.core.versioning`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from troth.core.access import Caller
from troth.core.names import ActorName
from troth.core.plugin import ActorPlugin, PluginFactory
from troth.core.records import Checkpoint

HOOKS = frozenset({"init", "resume", "pulse", "upgrade"})

F = TypeVar("F", bound=Callable[..., Any])


def internal(method: F) -> F:
    """Mark a CA method as internal: callable by other actors (``plugins.send``), by
    timers and ``on_result`` callbacks, and by the runtime's own extensions, but never
    by a client (HTTP, WebSocket, the client library, ``troth call``).

    A client naming an internal method gets 404, exactly as for a method that does not
    exist, so internal surfaces cannot even be probed.
    """
    method._troth_internal = True  # type: ignore[attr-defined]
    return method


class Plugins:
    """``self.plugins``: attribute access to the actor's plugin instances.

    A plugin instance is made on first use (or at activation when it keeps state in
    the checkpoint), so an actor pays only for the plugins it uses; one made during a
    transaction joins it at once (``on_create``).
    """

    def __init__(
        self,
        actor: ActorName,
        factories: dict[str, PluginFactory],
        active: dict[str, ActorPlugin],
        on_create: Callable[[ActorPlugin], None],
    ) -> None:
        self._actor = actor
        self._factories = factories
        self._active = active
        self._on_create = on_create

    def __getattr__(self, name: str) -> Any:
        """A plugin, found (or made) once: kept as an attribute of this object, the
        next access does not come here (an activation never drops a plugin)."""
        plugin = self._active.get(name)
        if plugin is None:
            factory = self._factories.get(name)
            if factory is None:
                raise AttributeError(
                    f"no plugin {name!r} is configured (have: {sorted(self._factories)})"
                )
            plugin = self._active[name] = factory.for_actor(self._actor, {})
            self._on_create(plugin)
        self.__dict__[name] = plugin
        return plugin

    def close(self) -> None:
        """The activation ended: making a plugin now is an error (it could take part
        in no transaction), and nothing here keeps the ended activation alive."""
        self._on_create = _ended


@functools.cache
def _type_logger(actor_type: str) -> logging.Logger:
    """The logger of an actor type's instances (found once: ``getLogger`` takes the
    logging module's lock, and a burst of activations makes thousands a second)."""
    return logging.getLogger(f"troth.core.actor.{actor_type}")


def _ended(plugin: object) -> None:
    raise RuntimeError(f"{type(plugin).__name__}: this actor's activation has ended")


class CA:
    """Base class of every troth actor ("Cloud Assistant").

    Subclasses set ``state_version`` (semver) and define public methods. A method's
    arguments and return value must be JSON-compatible (they cross HTTP) and the
    state must stay msgpack-serializable.
    """

    state_version: ClassVar[str] = "0.1.0"
    #: Default pulse interval; the type's ``pulse_seconds`` in the config overrides it.
    pulse_seconds: ClassVar[float | None] = None
    #: Default time an idle activation stays in memory (else the config's default,
    #: 300 s); the type's ``idle_seconds`` in the config overrides it.
    idle_seconds: ClassVar[float | None] = None

    def __init__(self, name: ActorName, plugins: Plugins) -> None:
        self.name = name
        self.plugins = plugins
        self.state: dict[str, Any] = {}
        self.scratch: dict[str, Any] = {}
        #: Who sent the message being handled (set for each transaction): a client's
        #: authenticated principal, or the sending actor for actor-to-actor messages.
        self.caller: Caller = Caller(None)
        self.log = _type_logger(name.type)
        self._troth_runtime: Any = None

    @property
    def now_ms(self) -> int:
        """The time of the transaction in progress, in ms since the epoch (outside one,
        the node's time). Read time here rather than from :mod:`time`: it is what the
        commit records, and :mod:`troth.testing` controls it."""
        runtime = self._troth_runtime
        if runtime is None:
            return int(time.time() * 1000)
        return int(runtime.now_ms())

    def delete_self(self) -> None:
        """Delete this actor when the current transaction commits: its checkpoint,
        timers, cached replies and notifications go in that same commit (outbox
        effects it committed before stay and are still performed). If the
        transaction rolls back, nothing is deleted. The next message to its name
        creates a new actor (``init`` again)."""
        if self._troth_runtime is None:
            raise RuntimeError("delete_self() is only possible inside a transaction")
        self._troth_runtime.deleting = True

    def passivate(self) -> None:
        """Let this activation go from memory once the current message has committed
        (or changed nothing) and no other message is queued for it. Nothing is
        deleted: the next message loads it from its checkpoint again (``resume``),
        and its timers and outbox entries run as usual meanwhile. For an actor that
        is done for a while, e.g. a finished commitment waiting out its retention,
        so that it holds no memory for ``idle_seconds``. If the message rolls back,
        the request is forgotten. Autonomous actors stay active (they pulse)."""
        if self._troth_runtime is None:
            raise RuntimeError("passivate() is only possible inside a transaction")
        self._troth_runtime.passivating = True

    def init(self) -> None:
        """First activation: fill ``self.state``."""

    def resume(self, checkpoint: Checkpoint) -> None:
        """Every reload from a checkpoint (after ``upgrade`` if one ran)."""

    def pulse(self) -> None:
        """Autonomous behaviour, every ``pulse_seconds``."""

    @classmethod
    def public_methods(cls) -> frozenset[str]:
        """Names a client may call: public, callable, defined below ``CA``, and not
        marked :func:`internal`."""
        return cls._methods()[0]

    @classmethod
    def internal_methods(cls) -> frozenset[str]:
        """Names marked :func:`internal`: reachable by actors and the runtime only."""
        return cls._methods()[1]

    @classmethod
    def _methods(cls) -> tuple[frozenset[str], frozenset[str]]:
        cached = cls.__dict__.get("_troth_methods")
        if isinstance(cached, tuple):
            return cached
        base = set(dir(CA))
        names = [
            n
            for n in dir(cls)
            if not n.startswith("_")
            and n not in base
            and n not in HOOKS
            and callable(getattr(cls, n, None))
        ]
        hidden = frozenset(n for n in names if getattr(getattr(cls, n), "_troth_internal", False))
        result = (frozenset(names) - hidden, hidden)
        cls._troth_methods = result  # type: ignore[attr-defined]
        return result
