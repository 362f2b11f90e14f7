"""Who may call what: the caller of a message and the access rule every entry applies.

Every message carries a :class:`Caller`. Its principal comes only from the
authenticated entry (an API key, the node's own configuration) or, for
actor-to-actor messages, from the sending actor's name; it is never an argument a
client chooses. It travels with forwarded calls inside a body signed with the
cluster secret, so the owning node applies the same rule as the entry node.

The rule (:func:`check_access`):

* a client reaches only the *public* methods of a type; :func:`troth.internal`
  methods are reserved to ``internal`` callers (other actors, timers, outbox
  callbacks, extensions such as the commitments API) and look like missing
  methods (404) to everyone else;
* a caller with a principal reaches only actors that principal owns (ids of the
  form ``principal-rest``); a caller without one is the operator or the runtime
  itself (no API keys configured, the CLI, outbox callbacks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from troth.core.errors import ForbiddenError, NotFoundError
from troth.core.names import ActorName


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a message. ``principal`` None means the operator or the runtime."""

    principal: str | None
    #: The sending actor (``TYPE/ID``) of an actor-to-actor message.
    actor: str | None = None
    #: May call methods marked :func:`troth.internal`.
    internal: bool = False

    @classmethod
    def of_actor(cls, sender: str) -> Caller:
        """The caller of a message an actor sent: it acts for its own owner."""
        return cls(ActorName.parse(sender).owner, actor=sender, internal=True)

    @property
    def builtin(self) -> bool:
        """Troth's own code (the runtime, a built-in API acting for a principal): an
        internal caller that is not an actor."""
        return self.internal and self.actor is None

    def to_dict(self) -> dict[str, Any]:
        return {"principal": self.principal, "actor": self.actor, "internal": self.internal}


#: The message that deletes an actor on an operator's order (``troth delete``): the
#: actor's last transaction, reserved to the runtime (:data:`SYSTEM`).
DELETE_ACTOR = "__troth_delete__"

#: The operator's own code: public methods of any actor (embedding, CLI, no API keys).
OPERATOR = Caller(None)
#: The runtime itself: outbox callbacks and built-in extensions.
SYSTEM = Caller(None, internal=True)


def check_access(
    caller: Caller,
    name: ActorName,
    method: str,
    public: frozenset[str],
    hidden: frozenset[str],
) -> None:
    """Raise unless ``caller`` may call ``method`` on ``name`` (see the module docstring).

    The method check comes first, so an unknown or internal method is a 404 whoever
    asks, and a 403 never confirms that a method exists.
    """
    if method == DELETE_ACTOR and caller == SYSTEM:
        return
    if method not in public and not (caller.internal and method in hidden):
        raise NotFoundError(f"actor type {name.type!r} has no public method {method!r}")
    if caller.principal is not None and name.owner != caller.principal:
        raise ForbiddenError(f"principal {caller.principal!r} does not own {name}")
