"""Extensions: an application that every node of a deployment hosts.

An actor type adds behaviour to one actor; an *extension* adds a whole application
to every node: actor types that need no entry in ``types``, plugins that are always
loaded, HTTP routes served next to the node's own, metrics on its ``/metrics``, and
a section of ``troth status``. Commitment-as-a-Service is one (:mod:`troth.caas`), built with
nothing but what this module offers; a user application uses it the same way.

The configuration names the extensions a node loads::

    "extensions": ["troth.caas:CaaS", "myapp.ext:Orders"]

Each is a ``module:Class`` whose class subclasses :class:`Extension` and takes no
arguments. Names an extension gives its actor types and plugins share one
namespace with the configuration's: a clash is a configuration error, never a
silent override.

Guarantees an extension can rely on:

* Its routes run on the node's event loop, behind the same authentication, body
  limit and error mapping as the node's own; :class:`NodeContext.call` applies the
  same access rule as a client's call, for the :class:`~troth.Caller` it is given.
* Its plugins' settings come from ``plugins.NAME`` of the configuration (``{}``
  when absent) and are validated by the plugin's own ``settings_model``.
* :meth:`Extension.status` reads Redis only; it runs in ``troth status``, where no
  node need be running.

Commands of the ``troth`` command line come from installed packages, not from the
configuration (the command line is parsed before any configuration is read): an
entry point of the group :data:`COMMANDS` names a function that takes argparse's
subparsers and adds its commands, each with ``func(args, config) -> int`` as its
default (``troth commitments`` is :func:`troth.caas.cli.add_commands`)::

    [project.entry-points."troth.commands"]
    orders = "myapp.cli:add_commands"

A package whose commands fail to load is reported, and the others still work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from troth.core.catalog import import_class
from troth.core.config import Config, ConfigError

if TYPE_CHECKING:
    import redis
    from fastapi import APIRouter
    from prometheus_client.registry import Collector

    from troth.core.access import Caller
    from troth.core.actor import CA
    from troth.core.clock import Clock
    from troth.core.keys import KeySpace
    from troth.core.names import ActorName
    from troth.core.plugin import PluginFactory
    from troth.engine.quotas import Quotas

__all__ = ["COMMANDS", "CallFn", "CallManyFn", "Extension", "NodeContext", "load_extensions"]

#: The entry point group of packages that add commands to ``troth`` (see above).
COMMANDS = "troth.commands"


class CallFn(Protocol):
    """Call an actor wherever it lives; resolves after the call's commit.

    Without a ``request_id`` one is made, so that retries across a handoff never
    apply the call twice, and the reply is kept for it; ``reply_cache=False`` skips
    both for a method that is idempotent by itself (it saves a write per call).
    ``fresh=True`` says the actor cannot exist yet (its name was just made from a
    random id), so activating it reads no checkpoint; use it only for a call that
    commits. ``together=True`` lets the call travel with the other calls for the same
    owner that this loop turn forwards, in one request answered when the slowest of
    them is: for the calls of one request (a batch of creations).
    """

    def __call__(
        self,
        name: ActorName,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        request_id: str | None,
        caller: Caller,
        *,
        reply_cache: bool = True,
        fresh: bool = False,
        together: bool = False,
    ) -> Awaitable[Any]: ...


class CallManyFn(Protocol):
    """One method on many actors at once, for a method idempotent by itself (no reply
    is kept): each call's reply, or the :class:`~troth.core.errors.TrothError` it
    failed with, in order. Cheaper than as many calls of :class:`CallFn` (a batch of
    creations); ``fresh`` as there, one flag a call."""

    def __call__(
        self,
        names: Sequence[ActorName],
        method: str,
        args: Sequence[list[Any]],
        caller: Caller,
        *,
        fresh: Sequence[bool],
    ) -> Awaitable[list[Any]]: ...


@dataclass(frozen=True, slots=True)
class NodeContext:
    """What an extension's routes may use of the node that serves them.

    ``client`` is a blocking Redis client: use it through ``asyncio.to_thread``
    from a route. ``plugins`` holds every plugin factory of the node by name.
    """

    node_id: str
    config: Config
    client: redis.Redis
    keys: KeySpace
    quotas: Quotas
    plugins: Mapping[str, PluginFactory]
    call: CallFn
    call_many: CallManyFn
    clock: Clock


class Extension:
    """Base of an application hosted by every node; every hook is optional."""

    #: Shown in logs and as the title of the extension's ``troth status`` section.
    name: ClassVar[str] = ""

    def actor_types(self) -> Mapping[str, type[CA]]:
        """Actor types every node hosts, by type name (not counted in quotas)."""
        return {}

    def plugins(self) -> Mapping[str, type[PluginFactory]]:
        """Plugins every node loads, by plugin name."""
        return {}

    def routes(self, node: NodeContext) -> APIRouter | None:
        """HTTP routes to serve next to the node's own (built once per node)."""
        return None

    def collectors(self, node: NodeContext) -> Sequence[Collector]:
        """Prometheus collectors to add to the node's ``/metrics`` (built once per
        node; a plugin factory registers its own through ``context.metrics``)."""
        return ()

    def status(self, client: redis.Redis, keys: KeySpace) -> dict[str, Any] | None:
        """This extension's section of ``troth status`` (JSON-encodable)."""
        return None


def load_extensions(config: Config) -> list[Extension]:
    """Instantiate the configuration's extensions, in order."""
    loaded: list[Extension] = []
    for path in config.extensions:
        cls = import_class(path)
        if not issubclass(cls, Extension):
            raise ConfigError(f"extensions: {path} is not a troth.extension.Extension")
        loaded.append(cls())
    return loaded
