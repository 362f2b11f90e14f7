"""Pure logic, no Redis: retry schedules and event filters."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from troth.caas.filters import matches, split_key, validate
from troth.core.retry import RetryPolicy, stored_policy


@pytest.mark.parametrize(
    ("policy", "delays"),
    [
        ({}, [0, 5, 25, 125, 625]),  # the documented default
        ({"backoff": "linear", "initial_delay_seconds": 10}, [0, 10, 20, 30, 40]),
        ({"backoff": "fixed", "initial_delay_seconds": 7}, [0, 7, 7, 7, 7]),
        ({"initial_delay_seconds": 1, "max_delay_seconds": 30}, [0, 1, 5, 25, 30]),
        ({"initial_delay_seconds": 0}, [0, 0, 0, 0, 0]),
    ],
)
def test_retry_schedules(policy: dict[str, Any], delays: list[float]) -> None:
    retry = RetryPolicy.model_validate(policy)
    assert [retry.delay_before(n) for n in range(1, 6)] == delays


def test_jitter_stays_within_its_fraction() -> None:
    retry = RetryPolicy(initial_delay_seconds=100, backoff="fixed", jitter=0.2)
    seen = {retry.delay_before(2) for _ in range(200)}
    assert min(seen) >= 80 and max(seen) <= 120 and len(seen) > 1


@pytest.mark.parametrize(
    "bad",
    [{"max_attempts": 0}, {"jitter": 2}, {"backoff": "random"}, {"initial_delay_seconds": -1}],
)
def test_bad_retry_policies_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RetryPolicy.model_validate(bad)
    for _ in range(2):  # validated once, refused every time
        with pytest.raises(ValidationError):
            stored_policy(bad)


def test_a_stored_policy_is_whole_validated_and_a_dict_of_its_own() -> None:
    """What an outbox entry keeps of its policy: every field, the same whether the
    policy came as a model or as a dict (validated once, then cached), and a copy
    that an entry may change without changing another's."""
    whole = RetryPolicy(max_attempts=3).model_dump()
    first = stored_policy({"max_attempts": 3})
    assert first == stored_policy(RetryPolicy(max_attempts=3)) == whole
    first["max_attempts"] = 9
    assert stored_policy({"max_attempts": 3}) == whole
    assert stored_policy({"max_attempts": 3.0}) == whole  # as pydantic takes it
    with pytest.raises(ValidationError):  # a value no cache can hold: validated still
        stored_policy({"max_attempts": 3, "backoff": ["fixed"]})


PAYLOAD = {
    "amount": 120,
    "currency": "EUR",
    "tags": ["vip", "eu"],
    "note": "paid in full",
    "customer": {"tier": "gold", "age": 41},
    "flag": True,
}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, True),
        ({"currency": "EUR"}, True),
        ({"currency": "USD"}, False),
        ({"amount_gte": 120, "amount_lt": 121}, True),
        ({"amount_gt": 120}, False),
        ({"amount_lte": 119.5}, False),
        ({"currency_ne": "USD"}, True),
        ({"missing_ne": "x"}, True),  # a missing field differs from anything
        ({"missing": None}, False),  # but matches nothing else
        ({"currency_in": ["EUR", "GBP"]}, True),
        ({"tags_contains": "vip"}, True),
        ({"note_contains": "full"}, True),
        ({"note_contains": "partial"}, False),
        ({"customer.tier": "gold", "customer.age_gte": 18}, True),
        ({"customer.tier.name": "gold"}, False),  # a path through a scalar
        ({"flag_gte": 1}, False),  # booleans are not numbers
        ({"currency": "EUR", "amount_gte": 1000}, False),  # every filter must match
    ],
)
def test_filters(filters: dict[str, Any], expected: bool) -> None:
    assert matches(validate(filters), PAYLOAD) is expected


def test_split_key_takes_the_operator_suffix_only() -> None:
    assert split_key("amount_gte") == ("amount", "_gte")
    assert split_key("status") == ("status", "")
    assert split_key("_in") == ("_in", "")  # a bare suffix is a field name


@pytest.mark.parametrize(
    ("filters", "problem"),
    [
        ({"amount_gte": "100"}, "gte needs a number"),
        ({"tags_contains": {"a": 1}}, "contains needs"),
        ({"currency_in": "EUR"}, "in needs a list"),
        ({"customer..tier": 1}, "dotted path"),
        ({f"f{i}": i for i in range(33)}, "at most 32"),
    ],
)
def test_filters_that_could_never_match_are_refused(filters: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        validate(filters)


def _plain(a: int, b: int = 2, *, c: int = 3) -> None: ...
def _required_kw(a: int, *, c: int) -> None: ...
def _varargs(a: int, *rest: int, **more: int) -> None: ...
def _nothing() -> None: ...


@pytest.mark.parametrize("fn", [_plain, _required_kw, _varargs, _nothing])
@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        ((1,), {}),
        ((1, 2), {}),
        ((1, 2, 3), {}),
        ((), {"a": 1}),
        ((1,), {"a": 1}),
        ((1,), {"c": 3}),
        ((1,), {"b": 2, "c": 3}),
        ((), {"a": 1, "zzz": 2}),
        ((1,), {"rest": 2}),
    ],
)
def test_argument_check_agrees_with_signature_bind(
    fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    import inspect

    from troth.engine.cell import ArgumentCheck

    signature = inspect.signature(fn)
    try:
        signature.bind(*args, **kwargs)
        fits = True
    except TypeError:
        fits = False
    check = ArgumentCheck(signature)
    if fits:
        check(args, kwargs)
    else:
        with pytest.raises(TypeError):
            check(args, kwargs)
