"""Semver state versioning on activation (design section 2)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from troth.core import versioning
from troth.core.errors import ActivationError
from troth.core.names import ActorName
from troth.edge import admin
from troth.node import Node

NAME = ActorName.parse("profile/alice-p")


def with_class(make_node: Callable[..., Node], cls: str) -> Node:
    return make_node("n1", types={"profile": {"class": f"examples.versioning.profiles:{cls}"}})


def write_v1(make_node: Callable[..., Node]) -> None:
    n = with_class(make_node, "ProfileV1")
    assert n.call(NAME, "set_name", ["Ada Lovelace"]).result(5) == "Ada Lovelace"
    n.stop()


def test_minor_upgrade_loads_transparently(
    make_node: Callable[..., Node], rclient: redis.Redis
) -> None:
    write_v1(make_node)
    n = with_class(make_node, "ProfileV1_1")
    assert n.call(NAME, "set_email", ["ada@example.org"]).result(5) == "ada@example.org"
    data = admin.inspect(rclient, n.keys, NAME)
    assert data is not None and data["version"] == "1.1.0"
    assert data["state"] == {"name": "Ada Lovelace", "email": "ada@example.org"}


def test_major_upgrade_migrates(make_node: Callable[..., Node], rclient: redis.Redis) -> None:
    write_v1(make_node)
    n = with_class(make_node, "ProfileV2")
    state = n.call(NAME, "get").result(5)
    assert state == {"first": "Ada", "last": "Lovelace", "email": None, "migrated_from": "1.0.0"}
    data = admin.inspect(rclient, n.keys, NAME)
    assert data is not None and data["version"] == "2.0.0"


@pytest.mark.parametrize(
    "first,then", [("ProfileV1", "ProfileV2NoUpgrade"), ("ProfileV2", "ProfileV1")]
)
def test_incompatible_fails_and_leaves_checkpoint(
    make_node: Callable[..., Node], rclient: redis.Redis, first: str, then: str
) -> None:
    n = with_class(make_node, first)
    n.call(NAME, "get").result(5)
    n.stop()
    before = admin.inspect(rclient, n.keys, NAME)
    n2 = with_class(make_node, then)
    with pytest.raises(ActivationError) as err:
        n2.call(NAME, "get").result(5)
    stored = "2.0.0" if first == "ProfileV2" else "1.0.0"
    wanted = "1.0.0" if first == "ProfileV2" else "2.0.0"
    assert stored in str(err.value) and wanted in str(err.value)
    after = admin.inspect(rclient, n2.keys, NAME)
    assert before is not None and after is not None
    assert {k: v for k, v in after.items() if k not in ("owner", "epoch")} == {
        k: v for k, v in before.items() if k not in ("owner", "epoch")
    }


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [
        ("1.0.0", "1.0.0", True),
        ("1.0.0", "1.4.2", True),
        ("1.2.0", "1.1.0", False),
        ("1.9.0", "2.0.0", False),
        ("0.2.1", "0.2.5", True),
        ("0.2.1", "0.3.0", False),
        ("0.0.1", "0.0.2", False),
    ],
)
def test_caret_compatibility(old: str, new: str, ok: bool) -> None:
    assert versioning.caret_compatible(old, new) is ok


def test_decide_names_both_versions() -> None:
    with pytest.raises(ActivationError, match=r"2\.0\.0.*1\.0\.0"):
        versioning.decide("x/y", "2.0.0", "1.0.0", has_upgrade=True)
    assert (
        versioning.decide("x/y", "1.0.0", "2.0.0", has_upgrade=True) is versioning.Decision.UPGRADE
    )
