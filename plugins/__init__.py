"""troth's transactional plugins, reached from an actor as ``self.plugins.NAME``.

=========  ===========================================================
``log``    structured logging tagged with the actor and message seq
``timers`` durable timers: ``after``, ``at``, ``every``, ``cancel``
``send``   messages to other actors, delivered at least once, processed once
``http``   outbound HTTP requests (webhooks) with idempotency keys and retries
``session`` notifications to client sessions, durable and in order
``commitments`` deliveries and index updates of the built-in commitment actor
=========  ===========================================================

The ``plugins`` section of the configuration names the plugins a node loads and
their settings. A third-party plugin is loaded with ``{"class": "module:Factory"}``
among its settings, where ``Factory`` subclasses :class:`troth.plugin.PluginFactory`.
"""

from __future__ import annotations

from typing import Any

from troth.catalog import import_class
from troth.config import ConfigError
from troth.plugin import NodeServices, PluginFactory

from .commitments import CommitmentsFactory
from .http import HttpFactory
from .log import LogFactory
from .send import SendFactory
from .session import SessionFactory
from .timers import TimersFactory

BUILTIN: dict[str, type[PluginFactory]] = {
    "log": LogFactory,
    "timers": TimersFactory,
    "send": SendFactory,
    "http": HttpFactory,
    "session": SessionFactory,
    "commitments": CommitmentsFactory,
}


def build_factories(node: NodeServices, settings: dict[str, Any]) -> dict[str, PluginFactory]:
    """Instantiate the configured plugins; errors name the plugin and the bad setting."""
    factories: dict[str, PluginFactory] = {}
    for name, raw in settings.items():
        options = dict(raw or {})
        class_path = options.pop("class", None)
        if class_path:
            cls = import_class(str(class_path))
            if not issubclass(cls, PluginFactory):
                raise ConfigError(f"plugins.{name}: {class_path} is not a PluginFactory")
        elif name in BUILTIN:
            cls = BUILTIN[name]
        else:
            raise ConfigError(
                f"plugins.{name}: unknown plugin (built-in: {sorted(BUILTIN)}; or give a 'class')"
            )
        try:
            factories[name] = cls(node, options)
        except ValueError as exc:
            raise ConfigError(f"plugins.{name}: {exc}") from exc
    return factories
