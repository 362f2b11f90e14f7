"""The engine: actors cost no thread, async methods keep their actor serialized,
blocking methods stall no one else, reads commit nothing, actors can delete
themselves."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import wait

import pytest
import redis

from conftest import TESTS, wait_until
from examples.helloworld.counter import Counter
from support_actors import PROBES, RESUMED
from troth.caas.actor import Commitment
from troth.core.catalog import Catalog
from troth.core.config import ConfigError, parse_config
from troth.core.errors import AppError, FencedError, RetryableError
from troth.core.keys import KeySpace
from troth.core.names import ActorName, shard_of
from troth.node import Node

SHARDS = 64


def shard_keys(rclient: redis.Redis, prefix: str, name: ActorName) -> list[str]:
    sk = KeySpace(prefix, SHARDS).shard(shard_of(name, SHARDS))
    return sorted(
        k.decode()
        for k in rclient.scan_iter(match=f"{sk.tag}:*", count=1000)
        if str(name) in k.decode()
    )


@pytest.mark.slow
def test_ten_thousand_active_actors_take_no_thread_each(
    make_node: Callable[..., Node],
) -> None:
    node = make_node("n1", types={"counter": {"class": "examples.helloworld.counter:AsyncCounter"}})
    names = [ActorName("counter", f"t-{i}") for i in range(10_000)]
    for chunk in range(0, len(names), 2000):
        wait([node.call(n, "increment") for n in names[chunk : chunk + 2000]], timeout=120)
    assert node.active_actors == 10_000
    assert threading.active_count() < 64, threading.active_count()
    assert node.call(names[-1], "get").result(5) == 1


def test_an_awaiting_actor_stays_serialized_while_others_run(
    make_node: Callable[..., Node],
) -> None:
    node = make_node("n1")
    napper, other = ActorName("probe", "alice-nap"), ActorName("probe", "alice-other")
    node.call(other, "get").result(5)
    first = node.call(napper, "nap", [0.5, "a"])
    second = node.call(napper, "nap", [0.5, "b"])
    time.sleep(0.1)  # the first nap is awaiting
    started = time.monotonic()
    node.call(other, "set", [1]).result(5)
    assert time.monotonic() - started < 0.1
    assert first.result(5) == ["a"]
    assert second.result(5) == ["a", "b"]  # the second read after the first wrote


@pytest.mark.parametrize(
    "runtime",
    [
        {},
        pytest.param(
            {"cpu": min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0},
            marks=pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux"),
            id="pinned",
        ),
    ],
)
def test_a_blocking_sync_method_does_not_stall_other_actors(
    make_node: Callable[..., Node], runtime: dict[str, int]
) -> None:
    """Also on a node pinned to one CPU (``runtime.cpu``): its workers share the
    loop's CPU, and one that sleeps takes none of it."""
    node = make_node("n1", runtime=runtime)
    blocker, other = ActorName("probe", "alice-block"), ActorName("probe", "alice-free")
    node.call(other, "get").result(5)
    blocked = node.call(blocker, "block", [1.5])
    time.sleep(0.2)
    for _ in range(5):
        started = time.monotonic()
        node.call(other, "set", [2]).result(5)
        assert time.monotonic() - started < 0.1
    assert blocked.result(5) == 1.5


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_runtime_cpu_pins_the_nodes_threads_only(
    make_node: Callable[..., Node],
) -> None:
    """``runtime.cpu``: the event loop, the threads running plain methods and the
    node's other threads are pinned to that CPU; the program that embeds the node
    keeps its own placement. A CPU this process may not use is refused before
    anything starts."""
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1]
    node = make_node("n1", runtime={"cpu": cpu})
    probe = ActorName("probe", "alice-cpu")
    assert node.call(probe, "loop_cpus").result(5) == [cpu]
    assert node.call(probe, "cpus").result(5) == [cpu]
    # the due-time queues' and the lease heartbeat's threads too
    helpers = [node.scheduler.queue._thread, node.dispatcher.queue._thread, node.leases._thread]
    for thread in helpers:
        assert thread is not None and thread.native_id is not None
        assert os.sched_getaffinity(thread.native_id) == {cpu}, thread.name
    assert sorted(os.sched_getaffinity(0)) == allowed
    with pytest.raises(ConfigError, match=r"runtime\.cpu: CPU 4096 is not one"):
        make_node("n2", runtime={"cpu": 4096})


def test_a_read_commits_nothing_and_is_still_fenced(
    make_node: Callable[..., Node], rclient: redis.Redis, prefix: str
) -> None:
    node = make_node("n1")
    name = ActorName("counter", "alice-r")
    node.call(name, "increment", request_id="w1").result(5)
    sk = KeySpace(prefix, SHARDS).shard(shard_of(name, SHARDS))
    seq = rclient.hget(sk.checkpoint(str(name)), "seq")
    for i in range(3):
        assert node.call(name, "get", request_id=f"r{i}").result(5) == 1
    assert rclient.hget(sk.checkpoint(str(name)), "seq") == seq
    assert rclient.hkeys(sk.replies(str(name))) == [b"w1"]
    rclient.hincrby(sk.lease, "epoch", 1)  # another node claimed the shard
    with pytest.raises(FencedError):
        node.call(name, "get").result(5)


def test_an_actor_can_delete_itself(
    make_node: Callable[..., Node], rclient: redis.Redis, prefix: str
) -> None:
    node = make_node("n1")
    name = ActorName("probe", "alice-gone")
    node.call(name, "set", [5], request_id="x").result(5)
    node.call(name, "after", [3600, "reminder"]).result(5)
    node.call(name, "tell", ["journal/alice-j", 1]).result(5)
    assert shard_keys(rclient, prefix, name)
    with pytest.raises(AppError):
        node.call(name, "leave", [True]).result(5)  # rolled back: nothing deleted
    assert node.call(name, "get").result(5)["value"] == 5
    node.call(name, "leave").result(5)
    sk = KeySpace(prefix, SHARDS).shard(shard_of(name, SHARDS))
    assert not rclient.exists(sk.checkpoint(str(name)), sk.replies(str(name)))
    assert not rclient.exists(sk.notifications(str(name)), sk.reply_times(str(name)))
    assert not rclient.sismember(sk.actors, str(name))
    assert not [k for k in rclient.hkeys(sk.timer_data) if str(name).encode() in k]
    assert len(node.scheduler) == 0
    # the next call makes a new actor
    assert node.call(name, "get").result(5)["value"] == 0


def test_an_actor_whose_first_messages_were_refused_is_not_kept_active(
    make_node: Callable[..., Node], rclient: redis.Redis, prefix: str
) -> None:
    """A refused creation (a duplicate commitment, a bad first call) committed nothing:
    its cell is let go at once instead of holding memory until it is idle; the next
    call starts the actor afresh, and an actor that committed stays active."""
    node = make_node("n1")
    name = ActorName("counter", "alice-refused")
    with pytest.raises(AppError):
        node.call(name, "increment", [0]).result(5)
    wait_until(lambda: str(name) not in node.engine.cells, timeout=2)
    assert node.active_actors == 0 and not shard_keys(rclient, prefix, name)
    assert node.call(name, "increment", [2]).result(5) == 2
    with pytest.raises(AppError):
        node.call(name, "increment", [0]).result(5)  # refused, but the actor exists
    assert str(name) in node.engine.cells and node.active_actors == 1


def test_an_actor_that_asks_to_passivate_leaves_memory_after_its_commit(
    make_node: Callable[..., Node],
) -> None:
    """CA.passivate: the activation goes once its message committed, long before it
    would be idle; the next call resumes it from its checkpoint; a message that rolls
    back forgets the request."""
    probe = {"class": "support_actors:Probe", "idle_seconds": 300}
    node = make_node("n1", types={"probe": probe})
    name = ActorName("probe", "alice-rest")
    assert node.call(name, "rest", [5]).result(5) == 5
    wait_until(lambda: str(name) not in node.engine.cells, timeout=2)
    state = node.call(name, "get").result(5)
    assert state["value"] == 5 and state["resumes"] == 1
    with pytest.raises(AppError):
        node.call(name, "rest", [6, True]).result(5)
    time.sleep(0.3)
    assert str(name) in node.engine.cells  # rolled back: it stays
    assert node.call(name, "get").result(5)["value"] == 5


def test_an_ended_activation_is_freed_at_once_not_by_the_garbage_collector(
    make_node: Callable[..., Node],
) -> None:
    """A passivated or deleted actor's instance, state and plugins are freed by
    reference counting as soon as its cell closes. An ended activation caught in a
    reference cycle waits for the cyclic collector instead, whose passes then grow
    long and frequent: about a tenth of a node's CPU when 100,000 commitments fired."""
    node = make_node("n1", types={"probe": {"class": "support_actors:Probe"}})
    rests, leaves = ActorName("probe", "alice-rests"), ActorName("probe", "alice-leaves")
    gc.disable()
    try:
        assert node.call(rests, "rest", [1]).result(5) == 1
        node.call(leaves, "set", [1]).result(5)
        node.call(leaves, "leave").result(5)  # its session plugin was made, too
        gone = [str(rests), str(leaves)]  # (membership tests: the node's loop changes both)
        wait_until(lambda: all(n not in node.engine.cells for n in gone), timeout=2)
        wait_until(lambda: all(n not in PROBES for n in gone), timeout=2)
    finally:
        gc.enable()


def test_generators_are_refused_at_registration() -> None:
    config = parse_config(
        {"python_path": [str(TESTS)], "types": {"bad": {"class": "support_actors:Streamer"}}}
    )
    with pytest.raises(ConfigError, match=r"Streamer\.events is a generator"):
        Catalog.from_config(config)


def test_a_class_sets_its_idle_time_and_the_config_overrides_it() -> None:
    """Commitments leave memory after 30 s idle (they are busy only when created and
    when they fire), other types after the config's default; a type's config wins."""
    types = {"slow": {"class": "support_actors:Ledger", "idle_seconds": 5}}
    config = parse_config({"python_path": [str(TESTS)], "types": types})
    catalog = Catalog.from_config(config, {"commitment": Commitment, "counter": Counter})
    assert catalog.get("commitment").idle_seconds == 30
    assert catalog.get("counter").idle_seconds == 300
    assert catalog.get("slow").idle_seconds == 5


def test_retryable_when_shard_not_owned(make_node: Callable[..., Node]) -> None:
    node = make_node("n1")
    node.leases.release(list(node.leases.owned))
    with pytest.raises(RetryableError):
        node.call(ActorName("counter", "alice-z"), "get").result(5)
    wait_until(lambda: node.leases.owned, timeout=5)


def test_a_plugins_resume_hook_runs_at_every_load(make_node: Callable[..., Node]) -> None:
    """An activation with no hook to run and nothing to write takes no resume
    transaction; a plugin that has a ``resume`` hook still gets it, with the
    checkpoint, every time its actor is loaded again."""
    types = {"ledger": {"class": "support_actors:Ledger", "idle_seconds": 0.2}}
    plugins = {"remembers": {"class": "support_actors:RemembersFactory"}, "session": {}}
    node = make_node("n1", types=types, plugins=plugins)
    name = ActorName("ledger", "alice-r")
    node.call(name, "keep", ["x"]).result(5)
    assert [r for r in RESUMED if r[0] == str(name)] == []  # created, not loaded
    for _ in range(2):
        wait_until(lambda: str(name) not in node.engine.cells, timeout=5)  # passivated
        assert node.call(name, "items").result(5) == []
    assert [r for r in RESUMED if r[0] == str(name)] == [(str(name), 1), (str(name), 1)]
