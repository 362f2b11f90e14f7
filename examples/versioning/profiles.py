"""versioning: three deployments of the same actor type.

* ``ProfileV1`` (1.0.0) keeps a single ``name`` string.
* ``ProfileV1_1`` (1.1.0) adds an optional ``email``: a compatible minor version,
  so checkpoints written by 1.0.0 load transparently.
* ``ProfileV2`` (2.0.0) splits ``name`` into ``first``/``last``: an incompatible
  major version, so ``upgrade(old, new)`` migrates the state on first load.

Run it: register ``ProfileV1`` as type ``profile``, call ``set_name``, stop the
node, switch the class path to ``ProfileV2`` and call ``get``.
"""

from __future__ import annotations

from typing import Any

import troth


class ProfileV1(troth.CA):
    state_version = "1.0.0"

    def init(self) -> None:
        self.state["name"] = ""

    def set_name(self, name: str) -> str:
        self.state["name"] = name
        return name

    def get(self) -> dict[str, Any]:
        return dict(self.state)


class ProfileV1_1(ProfileV1):
    state_version = "1.1.0"

    def set_email(self, email: str) -> str:
        self.state["email"] = email
        return email


class ProfileV2(troth.CA):
    state_version = "2.0.0"

    def init(self) -> None:
        self.state.update(first="", last="", email=None)

    def upgrade(self, old: str, new: str) -> None:
        first, _, last = self.state.pop("name", "").partition(" ")
        self.state.update(first=first, last=last, migrated_from=old)
        self.state.setdefault("email", None)

    def get(self) -> dict[str, Any]:
        return dict(self.state)


class ProfileV2NoUpgrade(troth.CA):
    """A 2.0.0 deployment that forgot its migration: activation must refuse."""

    state_version = "2.0.0"

    def get(self) -> dict[str, Any]:
        return dict(self.state)
