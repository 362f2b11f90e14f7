"""JSON that troth can store, echo and sign: the one parser for input from outside.

Python's ``json`` accepts documents that troth could not keep its promises with:
``NaN`` and ``Infinity`` (not JSON, and not encodable back), integers of thousands
of digits or beyond msgpack's 64-bit range (the checkpoint could not hold them),
lone UTF-16 surrogates (not encodable as UTF-8) and nesting deep enough to exhaust
the interpreter's stack. :func:`loads` refuses all of them with
:class:`~troth.core.errors.BadRequestError` (422) before anything runs, and
:func:`check_encodable` holds an actor's reply to the same standard before its
transaction commits.

Parsing is orjson's (several times faster than ``json``: it is on every request's
path), which already refuses ``NaN``, ``Infinity``, infinite floats and lone
surrogates. Two things it would let through are caught around it: a document with a
run of 20 digits or more (orjson turns integers beyond 64 bits into floats) is
parsed by the standard library with exact integer checks (so is one with a
negative run of 19), and one with as many
brackets as the depth limit has its nesting measured.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from troth.core.errors import BadRequestError, SerializationError

#: Deepest nesting of arrays and objects accepted.
MAX_DEPTH = 64
#: msgpack's integer range: signed 64-bit below zero, unsigned 64-bit above.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1


class _Refused(ValueError):
    pass


def _int(text: str) -> int:
    if len(text) > 21:  # sign + 20 digits: cheap refusal before int() does any work
        raise _Refused(f"integer {text[:24]}... is out of range")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise _Refused(f"integer {text} is outside [-2**63, 2**64-1]")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:24]} is out of range")
    return value


def _constant(text: str) -> Any:
    raise _Refused(f"{text} is not JSON")


#: An integer literal that may lie beyond 64 bits: below -(2**63) takes 19 digits after
#: its sign, above 2**64-1 takes 20 (a match inside a string only costs the slow path).
_LONG_DIGITS = re.compile(rb"-\d{19}|\d{20}")
#: Every digit made ``0``: a document without a run of 19 zeros then has no long
#: integer, which the pattern alone finds only by trying every position (1.8 us for a
#: commitment's 120 bytes of JSON, more than orjson takes to parse them; this 0.05).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_RUN = b"0" * 19


def loads(raw: bytes | str, what: str = "body") -> Any:
    """Parse ``raw`` strictly (see the module docstring); 422 naming the problem."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if _RUN in data.translate(_DIGITS_AS_ZERO) and _LONG_DIGITS.search(data):
        return _exact(data, what)
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"{what} is not valid JSON: {exc}") from None
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise BadRequestError(f"{what}: nested deeper than {MAX_DEPTH}")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether orjson's ``value`` nests containers more than ``limit`` deep: one level
    at a time, not a call a container (a batch of a hundred commitments has hundreds)."""
    level = [value] if type(value) is dict or type(value) is list else []
    for _ in range(limit):
        level = [
            child
            for item in level
            for child in (item.values() if type(item) is dict else item)
            if type(child) is dict or type(child) is list
        ]
        if not level:
            return False
    return bool(level)


def _exact(raw: bytes, what: str) -> Any:
    """The standard library's parser, with exact checks of every number."""
    try:
        value = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except _Refused as exc:
        raise BadRequestError(f"{what}: {exc}") from None
    except RecursionError:
        raise BadRequestError(f"{what}: nested deeper than {MAX_DEPTH}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"{what} is not valid JSON: {exc}") from None
    except ValueError as exc:  # e.g. the interpreter's own integer digit limit
        raise BadRequestError(f"{what}: {exc}") from None
    problem = _problem(value, 0)
    if problem:
        raise BadRequestError(f"{what}: {problem}")
    return value


def _problem(value: Any, depth: int) -> str | None:
    """What makes a parsed value unfit, if anything (iterative in spirit: bounded depth)."""
    if isinstance(value, str):
        return None if _encodable(value) else "strings must be valid Unicode (lone surrogate)"
    if isinstance(value, list | dict):
        if depth >= MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH}"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and not _encodable(key):
                return "keys must be valid Unicode (lone surrogate)"
            problem = _problem(item, depth + 1)
            if problem:
                return problem
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON: by orjson, and by the standard library when
    orjson refuses it (an integer beyond 64 bits, a key that is not a string). For
    values held to :func:`check_encodable` already (an actor's reply, a commitment's
    view): orjson's one leniency, ``NaN`` as ``null``, never applies to them."""
    try:
        return orjson.dumps(value)
    except TypeError:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")


def check_encodable(value: Any, what: str) -> None:
    """Raise :class:`SerializationError` unless ``value`` encodes as strict JSON."""
    kind = type(value)
    if kind is int or kind is bool or value is None:
        return  # most replies: nothing to encode to know
    if kind is float and math.isfinite(value):
        return
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"{what} is not JSON-encodable: {exc}") from None
