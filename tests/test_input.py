"""Every bad input gets a 4xx JSON error and changes nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis
from openapi_spec_validator import validate

from conftest import call


def strict(api: httpx.Client, path: str, raw: bytes) -> httpx.Response:
    return api.post(path, content=raw, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "raw",
    [
        b'{"args": [' + b"[" * 1000 + b"]" * 1000 + b"]}",  # nested 1,000 deep
        b'{"args": [' + b"[" * 70 + b"]" * 70 + b"]}",  # deeper than troth keeps
        b'{"args": [' + b"9" * 5000 + b"]}",  # beyond the interpreter's digit limit
        b'{"args": [18446744073709551616]}',  # 2**64: beyond msgpack
        b'{"args": [-9223372036854775809]}',
        b'{"args": [NaN]}',
        b'{"args": [Infinity]}',
        b'{"args": [1e400]}',
        b'{"args": ["\\ud800"]}',  # a lone surrogate
        b'{"kwargs": {"\\udfff": 1}}',
        b"\xff\xfe",
    ],
)
def test_hostile_json_is_a_422_and_runs_nothing(
    api: httpx.Client, rclient: redis.Redis, prefix: str, raw: bytes
) -> None:
    resp = strict(api, "/v1/actors/probe/alice-j/set", raw)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["type"] == "BadRequestError"
    assert not rclient.keys(f"{prefix}:*ca:probe/alice-j")


def test_integers_at_the_edges_of_the_range_are_kept(api: httpx.Client) -> None:
    for value in (2**64 - 1, -(2**63)):
        raw = f'{{"args": [{value}]}}'.encode()
        assert strict(api, "/v1/actors/probe/alice-k/set", raw).status_code == 200
        assert call(api, "probe/alice-k", "get").json()["result"]["value"] == value


@pytest.mark.parametrize("bad", ["nan", "bytes", "surrogate", "object"])
def test_a_reply_that_is_not_json_rolls_back(api: httpx.Client, bad: str) -> None:
    call(api, "probe/alice-r", "set", 1)
    resp = call(api, "probe/alice-r", "set_and_return", 2, bad)
    assert resp.status_code == 500, resp.text
    assert resp.json()["error"]["type"] == "SerializationError"
    assert call(api, "probe/alice-r", "get").json()["result"]["value"] == 1


def commitment(**trigger: Any) -> dict[str, Any]:
    return {
        "trigger": {"type": "time_after", **trigger},
        "obligation": {"target": "http://127.0.0.1:9/x"},
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (commitment(timestamp=1e12), "timestamp"),
        (commitment(timestamp=-1), "timestamp"),
        (commitment(timestamp="0001-01-01T00:00:00+01:00"), "timestamp"),
        (commitment(timestamp="2026-01-01T10:00:00"), "timezone"),
        ({**commitment(delay_seconds=1), "expires_at": 1e15}, "expires_at"),
        (
            {
                "trigger": {"type": "heartbeat", "event_type": "x", "interval_seconds": 1e-300},
                "obligation": {"target": "http://127.0.0.1:9/x"},
            },
            "interval_seconds",
        ),
        (
            {
                "trigger": {
                    "type": "webhook",
                    "event_type": "x",
                    "filters": {"tags_contains": [1]},
                },
                "obligation": {"target": "http://127.0.0.1:9/x"},
            },
            "contains",
        ),
        (
            {
                "trigger": {"type": "webhook", "event_type": "x", "filters": {"a..b": 1}},
                "obligation": {"target": "http://127.0.0.1:9/x"},
            },
            "dotted path",
        ),
        (
            {
                "trigger": {"type": "webhook", "event_type": "x", "filters": {"amount_gte": "9"}},
                "obligation": {"target": "http://127.0.0.1:9/x"},
            },
            "number",
        ),
    ],
)
def test_commitments_out_of_range_are_refused_and_not_created(
    api: httpx.Client, body: dict[str, Any], field: str
) -> None:
    resp = api.post("/v1/commitments", json=body)
    assert resp.status_code == 422, resp.text
    assert field in resp.text
    listing = api.get("/v1/commitments")
    assert listing.status_code == 200 and listing.json()["items"] == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "internal.example"},
        {"Transfer-Encoding": "chunked"},
        {"content-length": "5"},
        {"Connection": "close"},
        {"webhook-signature": "v1,forged"},
        {"Idempotency-Key": "mine"},
        {"X-Ok": "a\r\nX-Injected: 1"},
        {"X-Ok": "nul\x00"},
        {"Bad Name": "x"},
        {"X-\u00e9": "x"},
    ],
)
def test_reserved_or_malformed_headers_are_refused_at_create(
    api: httpx.Client, headers: dict[str, str]
) -> None:
    body = commitment(delay_seconds=60)
    body["obligation"]["headers"] = headers
    resp = api.post("/v1/commitments", json=body)
    assert resp.status_code == 422, resp.text
    assert "header" in resp.json()["error"]["message"]


def test_the_published_schema_is_valid_openapi(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    validate(spec)
    create = spec["paths"]["/v1/commitments"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/CommitmentCreate"
    for status in ("401", "403", "413", "422", "429", "500", "503", "504"):
        assert status in create["responses"], status
    assert not any(path.startswith("/v1/cluster") for path in spec["paths"])
