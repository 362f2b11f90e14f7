"""Commitment-as-a-Service as a troth extension: what it adds to every node.

Enabled by ``"extensions": ["troth.caas:CaaS"]`` (the default): the ``commitment``
and ``cmbus`` actor types, the ``commitments`` plugin (signed webhook deliveries and
the listing index), the ``/v1/commitments`` and ``/v1/events`` routes, the
``troth_commitments`` gauge, and the commitments section of ``troth status`` (by
status, the finished ones retained until their retention ends, and when the next
of them is retired).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import redis
from fastapi import APIRouter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from troth.caas.actor import Commitment, EventBus
from troth.caas.api import commitments_router
from troth.caas.delivery import iso
from troth.caas.index import CommitmentIndex
from troth.caas.plugin import CommitmentsFactory
from troth.core.actor import CA
from troth.core.keys import KeySpace
from troth.core.plugin import PluginFactory
from troth.extension import Extension, NodeContext
from troth.plugins.members import MembersFactory
from troth.plugins.send import SendFactory
from troth.plugins.timers import TimersFactory

__all__ = ["CaaS", "StatusCollector"]


class CaaS(Extension):
    name: ClassVar[str] = "commitments"

    def actor_types(self) -> Mapping[str, type[CA]]:
        return {"commitment": Commitment, "cmbus": EventBus}

    def plugins(self) -> Mapping[str, type[PluginFactory]]:
        # A commitment keeps its times with timers and (un)subscribes with send; a bus
        # keeps its subscribers with members.
        return {
            "commitments": CommitmentsFactory,
            "timers": TimersFactory,
            "send": SendFactory,
            "members": MembersFactory,
        }

    def routes(self, node: NodeContext) -> APIRouter:
        return commitments_router(node)

    def collectors(self, node: NodeContext) -> list[Collector]:
        index = CommitmentIndex(node.client, node.keys)
        return [StatusCollector(index, node.config.metrics.principal_labels)]

    def status(self, client: redis.Redis, keys: KeySpace) -> dict[str, Any]:
        """Commitments by status over every principal; ``retained``: the finished ones
        still kept, and ``next_retirement_at``: when the next of them is deleted (each
        is retired ``retention_seconds`` after it ended)."""
        index = CommitmentIndex(client, keys)
        totals: Counter[str] = Counter()
        for (_, status), n in index.counts().items():
            totals[status] += n
        section: dict[str, Any] = {k: v for k, v in sorted(totals.items()) if v}
        retained, next_retirement = index.retained()
        if retained:
            section["retained"] = retained
            section["next_retirement_at"] = iso(next_retirement)
        return section


class StatusCollector(Collector):
    """``troth_commitments{status}``, read from the index at scrape time; with
    ``metrics.principal_labels`` per principal too (``{principal, status}``): tenant
    names reach the metrics only when the operator asks for them."""

    def __init__(self, index: CommitmentIndex, principal_labels: bool = False) -> None:
        self.index = index
        self.principal_labels = principal_labels

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["principal", "status"] if self.principal_labels else ["status"]
        gauge = GaugeMetricFamily("troth_commitments", "Commitments by status.", labels=labels)
        try:
            counts = self.index.counts()
        except redis.RedisError:
            counts = {}
        if self.principal_labels:
            for (principal, status), n in sorted(counts.items()):
                gauge.add_metric([principal, status], n)
        else:
            totals: Counter[str] = Counter()
            for (_, status), n in counts.items():
                totals[status] += n
            for status, n in sorted(totals.items()):
                gauge.add_metric([status], n)
        yield gauge
