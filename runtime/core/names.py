"""Actor names (``TYPE/ID``), principals, and the stable actor-to-shard hash."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from troth.core.errors import BadRequestError

_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$")
_METHOD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")


def check_method(method: str) -> str:
    """A method name as every entry accepts it: an ASCII identifier of at most 100
    characters. Anything else (``../x``, ``a/b``, spaces) is refused (422) before it
    reaches routing, forwarding or the actor; a name that is well formed but not
    public (``_private``) is then a 404 by the access rule."""
    if not isinstance(method, str) or not _METHOD_RE.match(method):
        raise BadRequestError(f"method name {method!r} must match {_METHOD_RE.pattern}")
    return method


@dataclass(frozen=True, slots=True)
class ActorName:
    """A location-independent actor address.

    An ID of the form ``owner-rest`` belongs to the principal ``owner`` (the caf.js
    convention); an ID without a dash has no owner and only an unauthenticated or
    administrative caller may reach it when API keys are configured.
    """

    type: str
    id: str

    @classmethod
    def parse(cls, text: str) -> ActorName:
        type_, sep, id_ = text.partition("/")
        if not sep:
            raise BadRequestError(f"actor name {text!r} is not of the form TYPE/ID")
        return cls.of(type_, id_)

    @classmethod
    def of(cls, type_: str, id_: str) -> ActorName:
        if not _TYPE_RE.match(type_):
            raise BadRequestError(
                f"actor type {type_!r} must match {_TYPE_RE.pattern} (lowercase, digits, _)"
            )
        if not _ID_RE.match(id_):
            raise BadRequestError(
                f"actor id {id_!r} must match {_ID_RE.pattern} (at most 200 characters)"
            )
        return cls(type_, id_)

    @property
    def owner(self) -> str | None:
        head, sep, _ = self.id.partition("-")
        return head if sep else None

    def __str__(self) -> str:
        return f"{self.type}/{self.id}"


def shard_of(name: ActorName | str, shard_count: int) -> int:
    """The virtual shard of an actor: stable across processes, versions and hosts."""
    return zlib.crc32(str(name).encode()) % shard_count
