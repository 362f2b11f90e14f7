"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis).

For every published operation, generated requests (valid and invalid bodies, paths
and queries) must never get a 5xx, and every answer must match the document: a
declared status code, a declared content type, a body of the declared schema. Run
with and without API keys; bounded in examples and time so the suite stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from troth.node import Node

KEY = "f" * 16
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = 40


@pytest.mark.slow
@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "key"])
def test_no_request_gets_a_5xx_or_an_undocumented_answer(
    make_node: Callable[..., Node], keyed: bool
) -> None:
    overrides: dict[str, Any] = {"auth": {"api_keys": {KEY: "fz"}}} if keyed else {}
    node = make_node("n1", serve=True, node={"call_timeout_seconds": 3}, **overrides)
    headers = {"authorization": f"Bearer {KEY}"} if keyed else {}
    spec = httpx.get(f"{node.url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 10
    for operation in operations:
        cases = st.one_of(
            [operation.as_strategy(generation_mode=mode) for mode in schemathesis.GenerationMode]
        )
        # with keys, a third of the requests go without one (401, documented)
        auth = st.sampled_from([headers, headers, {}]) if keyed else st.just({})

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases, auth=auth)
        def fuzz(case: schemathesis.Case[Any], auth: dict[str, str]) -> None:
            response = case.call(base_url=node.url, headers=auth, timeout=10)
            case.validate_response(response, checks=CHECKS, headers=auth)

        fuzz()
