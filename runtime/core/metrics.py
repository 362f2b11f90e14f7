"""Prometheus metrics of one node, in a registry of its own.

A registry per node (rather than the process-global one) lets several nodes run in
one process, as the tests and benchmarks do, without clashing. What the event loop
counts for every message, call and delivery is kept in :class:`LoopCounter` and
:class:`LoopHistogram` (plain numbers, read at scrape time); what other threads update
(the Redis client's redirects) and the gauges are prometheus-client's own.
"""

from __future__ import annotations

import os
import time
from abc import abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, utils
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

#: How the exposition writes a bucket's bound (``1.0``, ``+Inf``), as the library does.
_le = cast(Callable[[float], str], utils.floatToGoString)

ChildT = TypeVar("ChildT")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass(slots=True)
class CounterChild:
    """One labelled series of a :class:`LoopCounter`."""

    value: float = 0.0
    created: float = field(default_factory=time.time)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


@dataclass(slots=True)
class HistogramChild:
    """One labelled series of a :class:`LoopHistogram`: a count per bucket (the last
    one +Inf), not cumulated until a scrape."""

    bounds: tuple[float, ...]
    counts: list[int]
    total: float = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount
        self.total += amount


class _LoopMetric(Collector, Generic[ChildT]):
    """A Prometheus metric updated from the node's event loop only.

    prometheus-client's own metrics take a lock and check their state at every
    update, which cost a node a few percent of its CPU on the paths that count every
    message, call and delivery. These keep plain numbers, safe because one thread (the
    loop) updates them; the registry reads them at scrape time (a scrape from another
    thread may see one update half done), in the library's exposition."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], ChildT] = {}
        self._plain = None if labelnames else self.labels()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> ChildT:
        """The series of these label values (made at its first use)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    @abstractmethod
    def _new_child(self) -> ChildT: ...

    def _unlabelled(self) -> ChildT:
        if self._plain is None:
            raise TypeError(f"{self.name} is labelled: use labels()")
        return self._plain


class LoopCounter(_LoopMetric[CounterChild]):
    """A counter (``NAME_total`` and ``NAME_created``) of the loop; see :class:`_LoopMetric`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        """Count on an unlabelled counter."""
        plain = self._plain or self._unlabelled()  # (the call only to refuse)
        plain.value += amount

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value, created=child.created)
        return [family]


class LoopHistogram(_LoopMetric[HistogramChild]):
    """A histogram of the loop (see :class:`_LoopMetric`): an observation is a binary
    search and two additions."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._les = [*(_le(b) for b in self.bounds), "+Inf"]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds, [0] * (len(self.bounds) + 1))

    def observe(self, amount: float) -> None:
        """Observe on an unlabelled histogram (:meth:`HistogramChild.observe`, inline)."""
        plain = self._plain or self._unlabelled()  # (the call only to refuse)
        plain.counts[bisect_left(plain.bounds, amount)] += 1
        plain.total += amount

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, list(child.counts), strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(values, buckets, child.total)
        return [family]


class ThreadSchedule(Collector):
    """How long one thread (the node's event loop) ran on a CPU, and how long it was
    ready to run but waited for one: the kernel's ``schedstat`` of the thread, read at
    scrape time (Linux; nothing is exported elsewhere).

    The waiting is what a node's users feel and its CPU figures do not show: another
    process on the same CPU (or a node pinned by ``runtime.cpu`` to a CPU that
    another takes), or threads of its own doing CPU-heavy work without the GIL.
    ``rate(wait) / (rate(run) + rate(wait))`` is the share of the time the loop
    wanted a CPU that it spent waiting for one (the Grafana panel's "waiting")."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._path: str | None = None
        registry.register(self)

    def watch(self, native_id: int) -> None:
        """Report the thread ``native_id`` (``threading.get_native_id()``)."""
        path = f"/proc/self/task/{native_id}/schedstat"
        self._path = path if os.path.exists(path) else None

    def describe(self) -> Iterable[Metric]:
        return []  # (what it exports depends on the platform)

    def collect(self) -> Iterable[Metric]:
        if self._path is None:
            return []
        try:
            with open(self._path) as f:
                ran_ns, waited_ns = (int(v) for v in f.read().split()[:2])
        except (OSError, ValueError):  # the thread ended (the node stopped)
            return []
        return [
            CounterMetricFamily(
                "troth_loop_cpu_seconds",
                "Time the node's event loop ran on a CPU.",
                value=ran_ns / 1e9,
            ),
            CounterMetricFamily(
                "troth_loop_cpu_wait_seconds",
                "Time the node's event loop was ready to run and waited for a CPU.",
                value=waited_ns / 1e9,
            ),
        ]


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = LoopCounter(
            "troth_messages",
            "Messages processed, by actor type and kind.",
            ["type", "kind"],
            registry=r,
        )
        self.commits = LoopCounter("troth_commits", "Transactions committed.", registry=r)
        self.rollbacks = LoopCounter(
            "troth_rollbacks",
            "Transactions rolled back, by actor type and cause.",
            ["type", "cause"],
            registry=r,
        )
        self.dedup_hits = LoopCounter(
            "troth_request_dedup_hits",
            "Calls answered from the committed-reply cache.",
            registry=r,
        )
        self.commit_latency = LoopHistogram(
            "troth_commit_latency_seconds",
            "Time from commit request to Redis reply.",
            _LATENCY_BUCKETS,
            registry=r,
        )
        self.message_latency = LoopHistogram(
            "troth_message_latency_seconds",
            "Time to run and commit one message.",
            _LATENCY_BUCKETS,
            registry=r,
        )
        self.active_actors = Gauge("troth_active_actors", "Actors active on this node.", registry=r)
        self.owned_shards = Gauge("troth_owned_shards", "Shards this node owns.", registry=r)
        self.outbox_backlog = Gauge(
            "troth_outbox_backlog",
            "Outbox entries of this node's shards due within two minutes or overdue.",
            registry=r,
        )
        self.timer_backlog = Gauge(
            "troth_timer_backlog",
            "Durable timers of this node's shards due within two minutes or overdue.",
            registry=r,
        )
        self.reads = LoopCounter(
            "troth_reads", "Messages that changed nothing and so committed nothing.", registry=r
        )
        self.grouped = LoopCounter(
            "troth_grouped_calls",
            "Calls run in a group commit with other queued calls of their actor.",
            registry=r,
        )
        self.sessions = Gauge("troth_sessions", "Client WebSocket sessions open.", registry=r)
        self.subscriptions = Gauge(
            "troth_subscriptions", "Notification subscriptions of the open sessions.", registry=r
        )
        self.outbox_attempts = LoopCounter(
            "troth_outbox_attempts",
            "Side-effect attempts, by kind and outcome.",
            ["kind", "outcome"],
            registry=r,
        )
        self.redis_redirects = Counter(
            "troth_redis_redirects",
            "Redis Cluster replies that sent a command elsewhere or later, by reply "
            "(MOVED, ASK, TRYAGAIN, CLUSTERDOWN): failovers and resharding.",
            ["reply"],
            registry=r,
        )
        #: (method, route, status) -> its series of both: one look-up a request.
        self._http: dict[tuple[str, str, int], tuple[CounterChild, HistogramChild]] = {}
        self.http_requests = LoopCounter(
            "troth_http_requests",
            "HTTP requests answered, by method, route (the path template) and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = LoopHistogram(
            "troth_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route.",
            _LATENCY_BUCKETS,
            ["method", "route"],
            registry=r,
        )
        #: ``outbox_attempt(kind, outcome)``: the series of ``outbox_attempts``.
        self.outbox_attempt = self.outbox_attempts.labels
        self.timers_fired = LoopCounter("troth_timers_fired", "Timers handled.", registry=r)
        self.loop_schedule = ThreadSchedule(r)
        self.timer_lateness = LoopHistogram(
            "troth_timer_lateness_seconds",
            "How late timers fired.",
            (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )

    def message_counter(self, actor_type: str, kind: str) -> CounterChild:
        return self.messages.labels(actor_type, kind)

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        series = self._http.get((method, route, status))
        if series is None:  # (bounded: methods, route templates and statuses are few)
            series = self._http[(method, route, status)] = (
                self.http_requests.labels(method, route, str(status)),
                self.http_latency.labels(method, route),
            )
        series[0].value += 1
        series[1].observe(seconds)

    def bind_gauges(
        self,
        active: Callable[[], float],
        shards: Callable[[], float],
        outbox: Callable[[], float],
        timers: Callable[[], float],
    ) -> None:
        """Gauges read live values at scrape time instead of being kept up to date."""
        self.active_actors.set_function(active)
        self.owned_shards.set_function(shards)
        self.outbox_backlog.set_function(outbox)
        self.timer_backlog.set_function(timers)

    def render(self) -> bytes:
        return generate_latest(self.registry)
