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
    factories: dict[str, PluginFactory] = {}
    for name, cls, options in _resolved(settings, required or {}):
        try:
            factories[name] = cls(context, options)
        except ValueError as exc:
            raise _refused(name, exc) from exc
    return factories


def check_settings(
    settings: dict[str, Any], required: Mapping[str, type[PluginFactory]] | None = None
) -> None:
    """What :func:`build_factories` checks with no node at hand (every plugin found,
    its settings valid by its ``settings_model``): ``troth serve`` checks first, so a
    mistake starts nothing, not even the embedded Redis."""
    for name, cls, options in _resolved(settings, required or {}):
        if cls.settings_model is not None:
            try:
                cls.settings_model.model_validate(options)
            except ValueError as exc:
                raise _refused(name, exc) from exc


def _resolved(
    settings: dict[str, Any], required: Mapping[str, type[PluginFactory]]
) -> list[tuple[str, type[PluginFactory], dict[str, Any]]]:
    """Each plugin to load: its name, its factory class and its settings."""
    found = []
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
        found.append((name, cls, options))
    return found


def _refused(name: str, exc: ValueError) -> ConfigError:
    if isinstance(exc, ValidationError):  # (its wording, never its input: secrets)
        return ConfigError(f"invalid configuration: {problems(exc, f'plugins.{name}')}")
    return ConfigError(f"plugins.{name}: {exc}")
