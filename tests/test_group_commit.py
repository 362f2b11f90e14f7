"""Group commit: the calls queued for one actor run one after another, each its own
transaction over the state the one before left, and commit together. Every test
queues its calls behind ``hold`` (an awaiting call that commits nothing), so that
they form one group, and checks what a caller relies on: each call's reply and
error, its effects once and in order, nothing of a failed call, and one commit."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest
import redis

from troth.core import codec
from troth.core.errors import AppError, RetryableError
from troth.core.keys import KeySpace, ShardKeys
from troth.core.names import ActorName, shard_of
from troth.node import Node

SHARDS = 64
LEDGER = {"ledger": {"class": "support_actors:Ledger"}}


def commits(node: Node) -> float:
    return node.metrics.registry.get_sample_value("troth_commits_total") or 0.0


def keys(prefix: str, name: ActorName) -> ShardKeys:
    return KeySpace(prefix, SHARDS).shard(shard_of(name, SHARDS))


def queued(node: Node, name: ActorName, *calls: tuple[Any, ...]) -> list[Future[Any]]:
    """``calls`` (method, args[, request_id]) queued behind a call that holds the
    actor for a moment; their futures, in order."""
    held = node.call(name, "hold", [0.3])
    time.sleep(0.05)  # hold is running: what follows queues up
    futures = [
        node.call(name, c[0], list(c[1]), request_id=c[2] if len(c) > 2 else None) for c in calls
    ]
    held.result(5)
    return futures


@pytest.fixture
def ledger(make_node: Callable[..., Node]) -> tuple[Node, ActorName]:
    node = make_node("n1", types=LEDGER)
    name = ActorName("ledger", "alice-l")
    node.call(name, "items").result(5)  # activated (and initialised: one commit)
    return node, name


def test_queued_calls_commit_together_each_seeing_the_one_before(
    ledger: tuple[Node, ActorName], rclient: redis.Redis, prefix: str
) -> None:
    node, name = ledger
    before = commits(node)
    replies = [f.result(5) for f in queued(node, name, *[("add", [i]) for i in range(20)])]
    assert replies == list(range(1, 21))
    assert commits(node) - before == 1
    sk = keys(prefix, name)
    assert rclient.hget(sk.checkpoint(str(name)), "seq") == b"21"  # init + one per write
    notes = [codec.unpack(e[b"d"]) for _, e in rclient.xrange(sk.notifications(str(name)))]
    assert notes == [{"added": i} for i in range(20)]
    assert node.call(name, "items").result(5) == list(range(20))


def test_a_failing_call_rolls_back_alone(
    ledger: tuple[Node, ActorName], rclient: redis.Redis, prefix: str
) -> None:
    node, name = ledger
    before = commits(node)
    ok1, bad, ok2 = queued(node, name, ("add", ["a"]), ("add", ["b", True]), ("add", ["c"]))
    assert ok1.result(5) == 1
    with pytest.raises(AppError, match="refused"):
        bad.result(5)
    assert ok2.result(5) == 2
    assert commits(node) - before == 1
    sk = keys(prefix, name)
    assert rclient.hget(sk.checkpoint(str(name)), "seq") == b"3"
    notes = [codec.unpack(e[b"d"]) for _, e in rclient.xrange(sk.notifications(str(name)))]
    assert notes == [{"added": "a"}, {"added": "c"}]
    assert node.call(name, "items").result(5) == ["a", "c"]


def test_a_reply_does_not_change_with_the_calls_after_it(ledger: tuple[Node, ActorName]) -> None:
    node, name = ledger
    read, write = queued(node, name, ("items", []), ("add", ["x"]))
    assert write.result(5) == 1
    assert read.result(5) == []  # not the list the next call appended to


@pytest.mark.parametrize("group_max", [1, 64])
def test_a_written_reply_does_not_change_with_the_writes_after_it(
    make_node: Callable[..., Node], group_max: int
) -> None:
    """A reply that is the state's own list stays as its call left it: the next call
    sees a decoded copy of the committed state, with group commit or without."""
    node = make_node("n1", types=LEDGER, runtime={"group_commit_max": group_max})
    name = ActorName("ledger", f"alice-w{group_max}")
    node.call(name, "items").result(5)
    first, second = queued(node, name, ("push", ["a"]), ("push", ["b"]))
    assert second.result(5) == ["a", "b"]
    assert first.result(5) == ["a"]
    assert node.call(name, "push", ["c"]).result(5) == ["a", "b", "c"]


def test_a_repeated_request_id_in_a_group_runs_once(
    ledger: tuple[Node, ActorName], rclient: redis.Redis, prefix: str
) -> None:
    node, name = ledger
    first, again = queued(node, name, ("add", ["x"], "r1"), ("add", ["x"], "r1"))
    assert first.result(5) == again.result(5) == 1
    assert node.call(name, "items").result(5) == ["x"]
    assert rclient.hkeys(keys(prefix, name).replies(str(name))) == [b"r1"]


def test_a_group_of_reads_writes_nothing_and_a_fenced_group_nothing_at_all(
    ledger: tuple[Node, ActorName], rclient: redis.Redis, prefix: str
) -> None:
    node, name = ledger
    sk = keys(prefix, name)
    before = commits(node)
    reads = queued(node, name, ("items", [], "r1"), ("items", [], "r2"))
    assert [f.result(5) for f in reads] == [[], []]
    assert commits(node) == before
    assert rclient.hget(sk.checkpoint(str(name)), "seq") == b"1"
    assert not rclient.exists(sk.replies(str(name)))

    held = node.call(name, "hold", [0.3])
    time.sleep(0.05)
    adds = [node.call(name, "add", [i]) for i in range(3)]
    rclient.hincrby(sk.lease, "epoch", 1)  # another node claimed the shard meanwhile
    for future in [held, *adds]:
        with pytest.raises(RetryableError):
            future.result(5)
    assert rclient.hget(sk.checkpoint(str(name)), "seq") == b"1"
    assert not rclient.exists(sk.notifications(str(name)))


def test_timers_set_and_cancelled_within_a_group(
    ledger: tuple[Node, ActorName], rclient: redis.Redis, prefix: str
) -> None:
    node, name = ledger
    for f in queued(
        node, name, ("remind", ["a"]), ("forget", ["a"]), ("forget", ["b"]), ("remind", ["b"])
    ):
        f.result(5)
    sk = keys(prefix, name)
    assert sorted(rclient.zrange(sk.timers, 0, -1)) == [f"{name}\x00b".encode()]
    assert len(node.scheduler) == 1


def test_member_reads_see_the_earlier_calls_of_the_group(ledger: tuple[Node, ActorName]) -> None:
    node, name = ledger
    replies = queued(node, name, ("join", ["m1"]), ("join", ["m2"]), ("join", ["m1"]))
    assert [f.result(5) for f in replies] == [1, 2, 2]
    assert node.call(name, "join", ["m3"]).result(5) == 3


def test_a_plugin_that_cannot_group_runs_its_call_again_alone(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(
        "n1",
        types=LEDGER,
        plugins={"session": {}, "timers": {}, "peek": {"class": "support_actors:PeekFactory"}},
    )
    name = ActorName("ledger", "alice-p")
    node.call(name, "items").result(5)
    a, peek, b = queued(node, name, ("add", ["a"]), ("peek", []), ("add", ["b"]))
    assert (a.result(5), b.result(5)) == (1, 2)
    assert peek.result(5) == 2  # rolled back at its first run, run again at a group's head
    assert node.call(name, "items").result(5) == ["a", "b"]
    before = commits(node)
    for f in queued(node, name, ("add", ["c"]), ("add", ["d"])):
        f.result(5)
    assert commits(node) - before == 2  # with that plugin, every call commits alone


def test_group_commit_can_be_turned_off(make_node: Callable[..., Node]) -> None:
    node = make_node("n1", types=LEDGER, runtime={"group_commit_max": 1})
    name = ActorName("ledger", "alice-o")
    node.call(name, "items").result(5)
    before = commits(node)
    assert [f.result(5) for f in queued(node, name, *[("add", [i]) for i in range(5)])] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert commits(node) - before == 5
    read, write = queued(node, name, ("items", []), ("add", ["x"]))
    assert write.result(5) == 6
    assert read.result(5) == [0, 1, 2, 3, 4]  # a read alone does not share the state either
