"""Prometheus metrics of one node, in a registry of its own.

A registry per node (rather than the process-global one) lets several nodes run in
one process, as the tests and benchmarks do, without clashing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Children:
    """The labelled children of one metric, cached: prometheus-client's ``labels()``
    takes a lock and checks its arguments on every call, which the hot paths (one
    count per message, per outbox attempt) need not pay again."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter(
            "troth_messages",
            "Messages processed, by actor type and kind.",
            ["type", "kind"],
            registry=r,
        )
        self.commits = Counter("troth_commits", "Transactions committed.", registry=r)
        self.rollbacks = Counter(
            "troth_rollbacks",
            "Transactions rolled back, by actor type and cause.",
            ["type", "cause"],
            registry=r,
        )
        self.dedup_hits = Counter(
            "troth_request_dedup_hits",
            "Calls answered from the committed-reply cache.",
            registry=r,
        )
        self.commit_latency = Histogram(
            "troth_commit_latency_seconds",
            "Time from commit request to Redis reply.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.message_latency = Histogram(
            "troth_message_latency_seconds",
            "Time to run and commit one message.",
            buckets=_LATENCY_BUCKETS,
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
        self.reads = Counter(
            "troth_reads", "Messages that changed nothing and so committed nothing.", registry=r
        )
        self.grouped = Counter(
            "troth_grouped_calls",
            "Calls run in a group commit with other queued calls of their actor.",
            registry=r,
        )
        self.sessions = Gauge("troth_sessions", "Client WebSocket sessions open.", registry=r)
        self.subscriptions = Gauge(
            "troth_subscriptions", "Notification subscriptions of the open sessions.", registry=r
        )
        self.outbox_attempts = Counter(
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
        self.http_requests = Counter(
            "troth_http_requests",
            "HTTP requests answered, by method, route (the path template) and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "troth_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._http_requests = Children(self.http_requests)
        self._http_latency = Children(self.http_latency)
        self._message_children = Children(self.messages)
        #: ``outbox_attempt(kind, outcome)``: the cached child of ``outbox_attempts``.
        self.outbox_attempt = Children(self.outbox_attempts)
        self.timers_fired = Counter("troth_timers_fired", "Timers handled.", registry=r)
        self.timer_lateness = Histogram(
            "troth_timer_lateness_seconds",
            "How late timers fired.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )

    def message_counter(self, actor_type: str, kind: str) -> Any:
        return self._message_children(actor_type, kind)

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self._http_requests(method, route, str(status)).inc()
        self._http_latency(method, route).observe(seconds)

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
