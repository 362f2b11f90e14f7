"""The actor types a node can host, resolved from the configuration."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from troth.core.actor import CA, HOOKS
from troth.core.config import ActorTypeConfig, Config, ConfigError
from troth.core.errors import NotFoundError
from troth.core.versioning import parse


@dataclass(frozen=True, slots=True)
class ActorType:
    name: str
    cls: type[CA]
    state_version: str
    pulse_seconds: float | None
    idle_seconds: float
    #: Counted against the owner's ``quotas.actors`` (built-in types keep their own).
    counted: bool = True
    #: What clients may call.
    methods: frozenset[str] = frozenset()
    #: What only actors and the runtime may call (:func:`troth.internal`).
    internal_methods: frozenset[str] = frozenset()
    autonomous: bool = False

    @property
    def has_upgrade(self) -> bool:
        return callable(getattr(self.cls, "upgrade", None))


def import_class(path: str) -> type:
    module_name, sep, attr = path.partition(":")
    if not sep:
        raise ConfigError(f"class path {path!r} must be 'module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {path!r}: {exc}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, type):
        raise ConfigError(f"{path!r} is not a class")
    return obj


class Catalog:
    """Actor types by name. ``commitment`` and other built-ins are added by the node."""

    def __init__(self, types: dict[str, ActorType]) -> None:
        self._types = dict(types)

    @classmethod
    def from_config(cls, config: Config, builtins: dict[str, type[CA]] | None = None) -> Catalog:
        for entry in config.python_path:
            path = str(config.resolve_path(entry).resolve())
            if path not in sys.path:
                sys.path.insert(0, path)
        types: dict[str, ActorType] = {}
        for name, ca_cls in (builtins or {}).items():
            path = f"{ca_cls.__module__}:{ca_cls.__qualname__}"
            tc = ActorTypeConfig.model_validate({"class": path})
            types[name] = build_type(name, ca_cls, tc, counted=False)
        for name, tc in config.types.items():
            ca_cls = import_class(tc.class_path)
            if not issubclass(ca_cls, CA):
                raise ConfigError(f"types.{name}: {tc.class_path} is not a troth.CA subclass")
            types[name] = build_type(name, ca_cls, tc)
        return cls(types)

    def get(self, name: str) -> ActorType:
        try:
            return self._types[name]
        except KeyError:
            raise NotFoundError(f"unknown actor type {name!r}") from None

    def __iter__(self) -> Iterator[ActorType]:
        return iter(self._types.values())


def check_methods(name: str, ca_cls: type[CA]) -> None:
    """Refuse, at registration, what could never run as a transaction: generator
    methods or hooks (sync or async) have no single reply to commit."""
    for method in sorted(ca_cls.public_methods() | ca_cls.internal_methods() | HOOKS):
        fn = getattr(ca_cls, method, None)
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise ConfigError(
                f"types.{name}: {ca_cls.__qualname__}.{method} is a generator; a method runs "
                "as one transaction with one reply: return a list instead"
            )


def build_type(name: str, ca_cls: type[CA], tc: ActorTypeConfig, counted: bool = True) -> ActorType:
    check_methods(name, ca_cls)
    version = tc.state_version or ca_cls.state_version
    try:
        parse(version)
    except Exception as exc:
        raise ConfigError(f"types.{name}: {exc}") from exc
    return ActorType(
        name=name,
        cls=ca_cls,
        state_version=version,
        pulse_seconds=tc.pulse_seconds or ca_cls.pulse_seconds,
        idle_seconds=(
            tc.idle_seconds
            if "idle_seconds" in tc.model_fields_set or ca_cls.idle_seconds is None
            else ca_cls.idle_seconds
        ),
        counted=counted,
        methods=ca_cls.public_methods(),
        internal_methods=ca_cls.internal_methods(),
        autonomous=(tc.pulse_seconds or ca_cls.pulse_seconds) is not None,
    )
