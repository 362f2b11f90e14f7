"""OpenTelemetry: a client call, its transaction and commit, the outbox entry it
made (attempted again by another node after a restart) and the webhook it sent are
one trace. Spans go to the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import Receiver, wait_until
from troth.core import tracing
from troth.edge.server import ServerThread
from troth.node import Node


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    yield exporter
    tracing.disable()


def trace_of(traceparent: str) -> int:
    return int(traceparent.split("-")[1], 16)


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


def test_call_transaction_commit_outbox_and_webhook_are_one_trace(
    spans: InMemorySpanExporter,
    make_node: Callable[..., Node],
    receiver: Receiver,
) -> None:
    node = make_node("n1")
    server = ServerThread(node).start()
    receiver.script = [503]  # the first attempt fails: the entry is attempted twice
    retry = {"max_attempts": 3, "initial_delay_seconds": 2, "backoff": "fixed"}
    with httpx.Client(base_url=node.url, timeout=15) as api:
        resp = api.post(
            "/v1/actors/probe/alice-t/nohook",
            json={"args": [receiver.url, {"n": 1}], "kwargs": {"retry": retry}},
        )
    assert resp.status_code == 200
    wait_until(lambda: receiver.count() == 1)
    # httpx's span of the call (the root), then the node's spans under it
    [client] = [s for s in spans.get_finished_spans() if s.name == "POST" and s.parent is None]
    trace_id = client.context.trace_id
    [handled] = [s for s in spans.get_finished_spans() if s.kind.name == "SERVER"]
    assert handled.context.trace_id == trace_id
    [message] = named(spans, "probe.nohook")
    [commit] = wait_until(lambda: named(spans, "troth.commit"))
    assert message.context.trace_id == commit.context.trace_id == trace_id
    assert commit.parent is not None and commit.parent.span_id == message.context.span_id
    first = receiver.requests[0].headers["traceparent"]
    assert trace_of(first) == trace_id

    # The node stops before the retry; another takes the shard and attempts the entry,
    # read back from Redis: still the same trace, under the same idempotency key.
    server.stop()
    node.stop()
    make_node("n2")
    wait_until(lambda: receiver.count() == 2, timeout=15)
    second = receiver.requests[1].headers
    assert trace_of(second["traceparent"]) == trace_id
    assert second["idempotency-key"] == receiver.requests[0].headers["idempotency-key"]
    attempts = wait_until(
        lambda: len(named(spans, "troth.outbox http")) == 2 and named(spans, "troth.outbox http")
    )
    assert {s.context.trace_id for s in attempts} == {trace_id}


def test_heartbeats_make_no_spans(
    spans: InMemorySpanExporter, make_node: Callable[..., Node]
) -> None:
    node = make_node("n1")
    node.leases.beat()
    assert not [s for s in spans.get_finished_spans() if "HMGET" in s.name]


def test_tracing_is_off_unless_the_environment_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert not tracing.wanted()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.wanted()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert tracing.wanted()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.wanted()
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert tracing.wanted()
