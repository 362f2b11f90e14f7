"""troth's transactional plugins, reached from an actor as ``self.plugins.NAME``.

============  ===========================================================
``log``       structured logging tagged with the actor and message seq
``timers``    durable timers: ``after``, ``at``, ``every``, ``cancel``
``send``      messages to other actors, delivered at least once, processed once
``http``      outbound HTTP requests (webhooks) with idempotency keys and retries
``session``   notifications to client sessions, durable and in order
``members``   a large set beside the state: one member written per change
============  ===========================================================

The ``plugins`` section of the configuration names the plugins a node loads and
their settings. A third-party plugin is loaded with ``{"class": "module:Factory"}``
among its settings, where ``Factory`` subclasses :class:`troth.core.plugin.PluginFactory`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from troth.core.catalog import import_class
from troth.core.config import ConfigError, problems
from troth.core.plugin import PluginContext, PluginFactory
from troth.plugins.http import HttpFactory
from troth.plugins.log import LogFactory
from troth.plugins.members import MembersFactory
from troth.plugins.send import SendFactory
from troth.plugins.session import SessionFactory
from troth.plugins.timers import TimersFactory

BUILTIN: dict[str, type[PluginFactory]] = {
    "log": LogFactory,
    "timers": TimersFactory,
    "send": SendFactory,
    "http": HttpFactory,
    "session": SessionFactory,
    "members": MembersFactory,
}


def build_factories(
    context: PluginContext,
    settings: dict[str, Any],
    required: Mapping[str, type[PluginFactory]] | None = None,
) -> dict[str, PluginFactory]:
    """Instantiate the configured plugins and the ``required`` ones (those of the
    extensions, configured or not); errors name the plugin and the bad setting."""
    required = required or {}
    factories: dict[str, PluginFactory] = {}
    for name, raw in {**dict.fromkeys(required), **settings}.items():
        options = dict(raw or {})
        class_path = options.pop("class", None)
        if class_path:
            cls = import_class(str(class_path))
            if not issubclass(cls, PluginFactory):
                raise ConfigError(f"plugins.{name}: {class_path} is not a PluginFactory")
        elif name in required:
            cls = required[name]
        elif name in BUILTIN:
            cls = BUILTIN[name]
        else:
            raise ConfigError(
                f"plugins.{name}: unknown plugin (built-in: {sorted(BUILTIN)}; others come "
                "with their extension, or give a 'class')"
            )
        try:
            factories[name] = cls(context, options)
        except ValidationError as exc:
            raise ConfigError(f"invalid configuration: {problems(exc, f'plugins.{name}')}") from exc
        except ValueError as exc:
            raise ConfigError(f"plugins.{name}: {exc}") from exc
    return factories
