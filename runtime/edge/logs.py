"""The log output of ``troth serve``: text for people, JSON lines for collectors.

Every line the runtime writes about a message carries its context
(:mod:`troth.core.logcontext`): ``node``, ``actor``, ``request_id`` and, with
tracing on, ``trace_id``; lines an actor logs through its ``log`` plugin also carry
``seq``. In JSON each line is one object with ``ts``, ``level``, ``logger`` and
``msg`` plus those keys, so that a collector can follow one actor, one request or
one trace across nodes. In text they follow the message in brackets.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from troth.core import logcontext, tracing

__all__ = ["ContextFilter", "JsonFormatter", "setup_logging"]

CONTEXT_KEYS = ("node", "actor", "seq", "request_id", "trace_id")


class ContextFilter(logging.Filter):
    """Adds the context of the message being handled to each record (keeping what
    the record says itself, such as the ``log`` plugin's ``actor``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = logcontext.CURRENT.get()
        if ctx is not None:
            for key in ("node", "actor", "request_id"):
                if getattr(record, key, None) is None:
                    setattr(record, key, getattr(ctx, key))
        if getattr(record, "trace_id", None) is None:
            record.trace_id = tracing.trace_id()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = [
            f"{key}={value}"
            for key in CONTEXT_KEYS
            if key != "seq" and (value := getattr(record, key, None)) is not None
        ]
        if not context:
            return line
        head, sep, rest = line.partition("\n")  # a traceback stays below the line
        return f"{head} [{' '.join(context)}]{sep}{rest}"


def setup_logging(level: str, fmt: str) -> None:
    """Send every log line to stderr at ``level``, as ``text`` or ``json``, with the
    context of the message it is about."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
