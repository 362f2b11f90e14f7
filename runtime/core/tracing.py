"""OpenTelemetry tracing: off unless the standard ``OTEL_*`` variables ask for it.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``,
``console``, any installed one) or an OTLP endpoint is set
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and
``OTEL_SDK_DISABLED`` is not ``true``; ``OTEL_SERVICE_NAME`` and the other
standard variables apply as usual. It needs ``pip install 'troth[otel]'``. Off,
it costs a flag test per message.

One client call is one trace:

* the HTTP request (FastAPI's instrumentation; a call forwarded to the owner node
  carries ``traceparent``);
* ``TYPE.method``: the actor's transaction, with ``troth.commit`` for its commit;
* every outbox entry the transaction commits keeps the ``traceparent`` of that
  transaction in the ledger, so the attempt (``troth.outbox KIND``), on this node
  or on the one that took the shard over after a crash, continues the same trace,
  and the webhook it sends carries ``traceparent`` (troth's HTTP client sets it);
* redis-py's commands (the sync client: leases, reads) are spans of their own
  (Redis' instrumentation); the engine's batched round trips are ``troth.commit``;
* ``troth call`` sends ``traceparent`` (httpx's instrumentation). The client
  library's WebSocket calls do not carry one yet: their trace starts at the node.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from troth.core.errors import TrothError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "enable",
    "enabled",
    "from_env",
    "parent",
    "span",
    "trace_id",
    "traceparent",
]

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_NOTHING = contextlib.nullcontext()


def enabled() -> bool:
    return _tracer is not None


def wanted() -> bool:
    """Whether the environment asks for tracing (see the module docstring)."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def from_env() -> bool:
    """Turn tracing on if the environment asks for it (once a process); True if on."""
    if _tracer is not None or not wanted():
        return enabled()
    try:
        from importlib.metadata import entry_points

        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TrothError(
            f"OTEL_* asks for tracing, but OpenTelemetry is not installed "
            f"(pip install 'troth[otel]'): {exc}"
        ) from exc
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "troth")})
    provider = TracerProvider(resource=resource)
    names = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower()
    for name in filter(None, (n.strip() for n in names.split(","))):
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found and name == "otlp":  # the protocol-specific names are registered
            found = entry_points(group="opentelemetry_traces_exporter", name="otlp_proto_http")
        if not found:
            raise TrothError(f"OTEL_TRACES_EXPORTER: no installed exporter named {name!r}")
        exporter_cls = next(iter(found)).load()
        provider.add_span_processor(BatchSpanProcessor(exporter_cls()))
    enable(provider)
    return True


def enable(provider: TracerProvider) -> None:
    """Trace into ``provider`` from now on (the tests pass one with an in-memory
    exporter); instruments the client libraries (:func:`_instrumentors`). Apps are
    instrumented as they are made (:func:`instrument_app`)."""
    global _tracer, _provider
    disable()
    _provider = provider
    _tracer = provider.get_tracer("troth")
    for instrumentor in _instrumentors():
        instrumentor.instrument(tracer_provider=provider)


def disable() -> None:
    global _tracer, _provider
    if _tracer is None:
        return
    for instrumentor in _instrumentors():
        instrumentor.uninstrument()
    _tracer = _provider = None


def _instrumentors() -> list[Any]:
    """redis-py and httpx (the CLI); troth's own HTTP client (webhooks, forwarded
    calls) sends ``traceparent`` itself."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    return [RedisInstrumentor(), HTTPXClientInstrumentor()]


def instrument_app(app: Any) -> None:
    """Trace a FastAPI app's requests (a no-op while tracing is off)."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=_provider, exclude_spans=["receive"])


def current() -> Context | None:
    """The current trace context, to hand to another task (None while off)."""
    if _tracer is None:
        return None
    from opentelemetry.context import get_current

    return get_current()


def span(
    name: str, context: Context | None = None, attributes: dict[str, Any] | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """A span made current for the ``with`` block, child of ``context`` (else of the
    current span); nothing while tracing is off."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(name, context=context, attributes=attributes)


def quiet() -> contextlib.AbstractContextManager[object]:
    """No spans from the instrumented libraries inside (the heartbeat's Redis
    pipelines, a second apart, are housekeeping, not anyone's request)."""
    if _tracer is None:
        return _NOTHING
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    return suppress_instrumentation()


def traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (None while off or outside one)."""
    if _tracer is None:
        return None
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent")


def parent(value: str | None) -> Context | None:
    """The context a stored ``traceparent`` names, to continue its trace."""
    if _tracer is None or not value:
        return None
    from opentelemetry.propagate import extract

    return extract({"traceparent": value})


def trace_id() -> str | None:
    """The current trace id (32 hex digits), for log lines; None outside a trace."""
    if _tracer is None:
        return None
    from opentelemetry.trace import get_current_span

    ctx = get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
