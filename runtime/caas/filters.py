"""Event filters: ``{"field": value, "amount_gte": 100, "tags_contains": "vip"}``.

A key is a payload field (dotted paths reach into objects: ``"customer.tier"``),
optionally followed by an operator suffix. Without a suffix it is equality. All
filters must match (AND). A missing field matches nothing except ``_ne``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MAX_FILTERS = 32

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "_gte": lambda a, b: _num(a) and a >= b,
    "_gt": lambda a, b: _num(a) and a > b,
    "_lte": lambda a, b: _num(a) and a <= b,
    "_lt": lambda a, b: _num(a) and a < b,
    "_ne": lambda a, b: a != b,
    "_in": lambda a, b: a in b,
    "_contains": lambda a, b: (
        (isinstance(a, str) and isinstance(b, str) and b in a) or (isinstance(a, list) and b in a)
    ),
}
_MISSING = object()


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def split_key(key: str) -> tuple[str, str]:
    """``"amount_gte"`` -> ``("amount", "_gte")``; ``"status"`` -> ``("status", "")``."""
    for suffix in _OPS:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def validate(filters: dict[str, Any]) -> dict[str, Any]:
    """Raise ValueError naming the bad filter; return the filters unchanged.

    A filter that could never match as written (a comparison with a non-number, a
    ``contains`` of an object, a path with an empty step) is refused here rather
    than accepted and silently never fired.
    """
    if len(filters) > MAX_FILTERS:
        raise ValueError(f"at most {MAX_FILTERS} filters")
    for key, value in filters.items():
        field, op = split_key(key)
        if not field or len(field) > 200 or "" in field.split("."):
            raise ValueError(f"filter {key!r}: field must be a dotted path of non-empty names")
        if op == "_contains" and not _scalar(value):
            raise ValueError(f"filter {key!r}: contains needs a string, number or boolean")
        if op in ("_gte", "_gt", "_lte", "_lt") and not _num(value):
            raise ValueError(f"filter {key!r}: {op[1:]} needs a number, got {value!r}")
        if op == "_in" and not (isinstance(value, list) and len(value) <= 1000):
            raise ValueError(f"filter {key!r}: in needs a list of at most 1000 values")
    return filters


def _get(payload: Any, path: str) -> Any:
    value = payload
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def matches(filters: dict[str, Any], payload: Any) -> bool:
    for key, expected in filters.items():
        field, op = split_key(key)
        actual = _get(payload, field)
        if actual is _MISSING:
            if op == "_ne":
                continue
            return False
        if op == "":
            if actual != expected:
                return False
        elif not _OPS[op](actual, expected):
            return False
    return True
