"""Fencing, passivation, autonomous actors: the node's lifecycle guarantees."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis

from conftest import wait_until
from troth.core.errors import FencedError, RetryableError
from troth.core.names import ActorName, shard_of
from troth.edge import admin
from troth.node import Node

COUNTER = ActorName.parse("counter/alice-c")


def test_stale_epoch_commit_is_refused_and_actor_stops(node: Node, rclient: redis.Redis) -> None:
    assert node.call(COUNTER, "increment", [1]).result(5) == 1
    shard = shard_of(COUNTER, node.keys.shard_count)
    lease = node.keys.shard(shard).lease
    # A second owner claims the shard: bump the epoch behind the node's back.
    rclient.hset(
        lease, mapping={"owner": "intruder", "epoch": int(rclient.hget(lease, "epoch")) + 1}
    )
    with pytest.raises(FencedError):
        node.call(COUNTER, "increment", [1]).result(5)
    data = admin.inspect(rclient, node.keys, COUNTER)
    assert data is not None and data["state"] == {"count": 1}
    assert str(COUNTER) not in node.engine.cells  # the stale cell stopped
    # The intruder is not a live node: the node reclaims the shard and serves again.
    wait_until(lambda: node.leases.epoch_of(shard) is not None, timeout=5)
    assert wait_until(lambda: _try(node), timeout=5) == 2


def test_a_shard_lost_while_a_message_runs_fails_it_as_the_caller_can_retry(
    node: Node, rclient: redis.Redis
) -> None:
    """The lease moves while ``nap`` awaits; the node forgets the shard's cells. The
    nap then makes its first plugin and commits: refused, and the caller is told to
    retry (not an actor error about an activation that ended under it)."""
    name = ActorName("probe", "alice-napper")
    napping = node.call(name, "nap", [0.6, "a"])
    time.sleep(0.3)  # activated, and awaiting
    shard = shard_of(name, node.keys.shard_count)
    lease = node.keys.shard(shard).lease
    rclient.hset(lease, "epoch", int(rclient.hget(lease, "epoch")) + 1)
    asyncio.run_coroutine_threadsafe(node.engine.drop_shards({shard}, drain=False), node.loop)
    with pytest.raises(RetryableError):
        napping.result(5)
    assert admin.inspect(rclient, node.keys, name) is None  # nothing of it committed


def _try(node: Node) -> int | None:
    try:
        return int(node.call(COUNTER, "increment", [1]).result(5))
    except RetryableError:
        return None


def test_passivation_and_reactivation_from_checkpoint(node: Node) -> None:
    probe = ActorName.parse("probe/alice-p")
    node.call(probe, "set", [42]).result(5)
    assert str(probe) in node.engine.cells
    wait_until(lambda: str(probe) not in node.engine.cells, timeout=5)  # idle_seconds = 0.5
    state = node.call(probe, "get").result(5)
    assert state["value"] == 42 and state["resumes"] == 1 and state["inits"] == 1
    assert node.call(probe, "scratch_seq").result(5) is not None


def test_autonomous_actor_pulses_without_traffic_and_wakes_on_claim(
    make_node: Callable[..., Node],
) -> None:
    hb = ActorName.parse("heartbeat/alice-h")
    n1 = make_node("n1")
    n1.call(hb, "wake").result(5)
    wait_until(lambda: n1.call(hb, "status").result(5)["pulses"] >= 3, timeout=5)
    n1.stop()
    time.sleep(0.3)
    n2 = make_node("n2")  # claims the released shards and wakes the actor by itself
    before = n2.client.hget(n2.keys.shard(shard_of(hb, 64)).checkpoint(str(hb)), "seq")
    time.sleep(1.0)
    after = n2.client.hget(n2.keys.shard(shard_of(hb, 64)).checkpoint(str(hb)), "seq")
    assert int(after or 0) >= int(before or 0) + 3
