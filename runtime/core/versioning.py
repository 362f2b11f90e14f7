"""Semver state versioning: may code of version ``new`` load state written by ``old``?

* ``old == new``, or ``new`` satisfies ``^old`` (same major, not older; for 0.x the
  same minor) -> load transparently and record ``new`` at the next commit.
* ``new`` is newer but breaks ``^old`` -> the class's ``upgrade(old, new)`` migrates
  the state inside the resume transaction; without ``upgrade`` activation fails.
* ``new`` is older than ``old`` (a rollback of the deployment) -> activation fails:
  old code cannot know what newer state means.

A failed activation never writes: the checkpoint stays as it was, so that a
corrected deployment can still load it.
"""

from __future__ import annotations

import enum

import semver

from troth.core.errors import ActivationError


class Decision(enum.Enum):
    LOAD = "load"
    UPGRADE = "upgrade"


def parse(version: str) -> semver.Version:
    try:
        return semver.Version.parse(version)
    except ValueError as exc:
        raise ActivationError(f"state version {version!r} is not semver: {exc}") from exc


def caret_compatible(old: str, new: str) -> bool:
    """Whether ``new`` satisfies ``^old``."""
    o, n = parse(old), parse(new)
    if n < o:
        return False
    if o.major > 0:
        return n.major == o.major
    if o.minor > 0:
        return n.major == 0 and n.minor == o.minor
    return n.major == 0 and n.minor == 0 and n.patch == o.patch


def decide(actor: str, stored: str, current: str, has_upgrade: bool) -> Decision:
    """What to do when code at ``current`` loads a checkpoint written at ``stored``."""
    if stored == current or caret_compatible(stored, current):
        return Decision.LOAD
    if parse(current) < parse(stored):
        raise ActivationError(
            f"{actor}: checkpoint state version {stored} is newer than the code's "
            f"state_version {current}; refusing to downgrade (checkpoint left untouched)"
        )
    if not has_upgrade:
        raise ActivationError(
            f"{actor}: checkpoint state version {stored} is not compatible with "
            f"state_version {current} and the class defines no upgrade(old, new) "
            "(checkpoint left untouched)"
        )
    return Decision.UPGRADE
