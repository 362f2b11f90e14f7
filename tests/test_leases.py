"""Shard leases, driven beat by beat on a manual clock against a real Redis.

Each test plays several nodes as lease managers in one process, calling ``beat()``
itself instead of running the heartbeat threads, so every step is deterministic:
claims up to a fair share, hand-offs above it, takeover after expiry, fencing of
the previous owner, adoption after a quick restart under the same id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import redis

from troth.cluster.leases import LeaseManager
from troth.core.clock import ManualClock
from troth.core.keys import KeySpace

SHARDS = 16
TTL = 2.0


@dataclass
class Member:
    """One node's lease manager and what it was told."""

    manager: LeaseManager
    gained: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    surplus: list[int] = field(default_factory=list)

    @property
    def owned(self) -> set[int]:
        return set(self.manager.owned)


MakeMember = Callable[[str], Member]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_700_000_000_000)


@pytest.fixture
def member(rclient: redis.Redis, prefix: str, clock: ManualClock) -> MakeMember:
    keys = KeySpace(prefix, SHARDS)

    def make(node_id: str) -> Member:
        holder: list[Member] = []

        def surplus(shards: list[int]) -> None:
            holder[0].surplus.extend(shards)
            holder[0].manager.release(shards)  # after draining the shards' actors

        manager = LeaseManager(
            rclient,
            keys,
            node_id,
            TTL,
            TTL / 4,
            on_gained=lambda gained: holder[0].gained.extend(gained),
            on_lost=lambda lost: holder[0].lost.extend(lost),
            on_surplus=surplus,
            node_info=lambda: {"url": f"http://{node_id}"},
            clock=clock,
        )
        holder.append(Member(manager))
        return holder[0]

    return make


def epochs(rclient: redis.Redis, prefix: str) -> list[int]:
    keys = KeySpace(prefix, SHARDS)
    return [int(rclient.hget(keys.shard(s).lease, "epoch") or 0) for s in range(SHARDS)]


def test_a_lone_node_claims_every_shard_once(
    member: MakeMember, rclient: redis.Redis, prefix: str
) -> None:
    a = member("a")
    a.manager.beat()
    assert a.owned == set(range(SHARDS)) and sorted(a.gained) == list(range(SHARDS))
    a.manager.beat()
    assert len(a.gained) == SHARDS  # renewing claims nothing again
    assert epochs(rclient, prefix) == [1] * SHARDS


def test_a_joining_node_gets_a_fair_share_by_handoff(member: MakeMember) -> None:
    a, b = member("a"), member("b")
    a.manager.beat()
    b.manager.beat()  # b is live, but every shard is held by a live node
    assert b.owned == set()
    a.manager.beat()  # a sees two live nodes: hands off its surplus
    assert len(a.surplus) == SHARDS // 2 and len(a.owned) == SHARDS // 2
    b.manager.beat()
    assert b.owned == set(a.surplus) and not (a.owned & b.owned)


def test_a_silent_node_is_taken_over_and_fenced(
    member: MakeMember, clock: ManualClock, rclient: redis.Redis, prefix: str
) -> None:
    a, b = member("a"), member("b")
    a.manager.beat()
    b.manager.beat()
    held = a.owned
    clock.advance(TTL + 0.1)  # a is paused: it does not beat
    b.manager.beat()
    assert b.owned == set(range(SHARDS))
    assert epochs(rclient, prefix) == [2] * SHARDS  # every claim bumped the epoch
    a.manager.beat()  # a wakes up: what it held is gone, reported as lost
    assert set(a.lost) == held and a.owned == set()
    assert all(a.manager.epoch_of(s) is None for s in held)


def test_the_next_beat_comes_just_after_a_silent_node_expires(
    member: MakeMember, clock: ManualClock
) -> None:
    """A killed node's shards are claimed a lease TTL after its last beat, not up to a
    heartbeat later: the survivor times its next beat to the expiry."""
    a, b = member("a"), member("b")
    a.manager.beat()
    b.manager.beat()
    assert b.manager.next_beat_in == TTL / 4  # a is alive for a whole TTL
    clock.advance(TTL - 0.3)  # a is silent since its beat
    b.manager.beat()
    assert b.manager.next_beat_in == pytest.approx(0.305)
    assert b.owned != set(range(SHARDS))
    clock.advance(b.manager.next_beat_in)
    b.manager.beat()
    assert b.owned == set(range(SHARDS))
    assert b.manager.next_beat_in == TTL / 4  # no other node left


def test_a_restart_under_the_same_id_adopts_its_leases_at_once(member: MakeMember) -> None:
    a, b = member("a"), member("b")
    a.manager.beat()
    b.manager.beat()
    a.manager.beat()
    b.manager.beat()
    mine = a.owned
    again = member("a")  # a was killed and restarted before its lease expired
    again.manager.beat()
    assert again.owned == mine and again.lost == []
    assert b.owned == set(range(SHARDS)) - mine


def test_a_graceful_stop_releases_and_deregisters(member: MakeMember) -> None:
    a, b = member("a"), member("b")
    a.manager.beat()
    a.manager.stop(release=True)
    b.manager.beat()  # no expiry to wait for
    assert b.owned == set(range(SHARDS))
    assert b.manager.live_nodes == ["b"]
