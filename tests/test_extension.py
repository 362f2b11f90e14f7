"""Extensions: an application hosted by every node through the public interface that
Commitment-as-a-Service itself uses (examples/polls)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from conftest import base_config
from troth.caas import CaaS
from troth.core.config import ConfigError, parse_config
from troth.core.keys import KeySpace
from troth.edge import admin
from troth.edge.server import ServerThread
from troth.extension import load_extensions
from troth.node import Node

POLLS = "examples.polls.extension:Polls"


def serve(make_node: Callable[..., Node], extensions: list[str]) -> tuple[Node, httpx.Client]:
    node = make_node("n1", serve=True, extensions=extensions)
    return node, httpx.Client(base_url=node.url, timeout=10)


def test_an_extension_brings_types_routes_and_status(
    make_node: Callable[..., Node], rclient: Any, prefix: str
) -> None:
    node, http = serve(make_node, ["troth.caas:CaaS", POLLS])
    with http:
        opened = http.put("/v1/polls/lunch", json={"question": "Where?", "options": ["a", "b"]})
        assert opened.status_code == 200, opened.text
        for option in ["a", "b", "a"]:
            assert http.post("/v1/polls/lunch/votes", json={"option": option}).status_code == 200
        assert http.get("/v1/polls/lunch").json() == {
            "question": "Where?",
            "votes": {"a": 2, "b": 1},
        }
        wrong = http.post("/v1/polls/lunch/votes", json={"option": "c"})
        assert wrong.status_code == 409
        assert wrong.json()["error"]["data"] == {"options": ["a", "b"]}
        assert http.post("/v1/polls/lunch/votes", json={"option": 1}).status_code == 422
        assert http.get("/v1/polls/nope").status_code == 404
        assert "/v1/polls/{poll_id}/votes" in http.get("/openapi.json").json()["paths"]
        # CaaS is there too, side by side.
        assert http.get("/v1/commitments").status_code == 200
    data = admin.status(rclient, KeySpace(prefix, 64), load_extensions(node.config))
    assert data["polls"] == {"polls": 1}
    assert "commitments" in data


def test_without_extensions_a_node_is_only_the_runtime(redis_url: str, prefix: str) -> None:
    raw = base_config(prefix, extensions=[])
    del raw["plugins"]["commitments"]  # the CaaS plugin is unknown without CaaS
    node = Node(parse_config(raw), redis_url)
    node.start()
    server = ServerThread(node).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.get("/v1/commitments").status_code == 404
            r = http.post("/v1/actors/commitment/local-x/get", json={})
            assert r.status_code == 404
            assert http.post("/v1/actors/counter/c/increment", json={}).json() == {"result": 1}
        assert "commitment" not in {t.name for t in node.catalog}
    finally:
        server.stop()
        node.stop()


@pytest.mark.parametrize(
    ("extensions", "problem"),
    [
        (["examples.polls.extension:Poll"], "is not a troth.extension.Extension"),
        (["examples.polls.nowhere:Polls"], "cannot import"),
        (["troth.caas"], "must be 'module:ClassName'"),
    ],
)
def test_bad_extensions_are_configuration_errors(
    redis_url: str, prefix: str, extensions: list[str], problem: str
) -> None:
    config = parse_config(base_config(prefix, extensions=extensions))
    with pytest.raises(ConfigError, match=problem):
        Node(config, redis_url)


def test_an_actor_type_defined_twice_is_refused(redis_url: str, prefix: str) -> None:
    config = parse_config(base_config(prefix, extensions=[POLLS, "support_actors:PollsAgain"]))
    with pytest.raises(ConfigError, match="actor type 'poll' is defined twice"):
        Node(config, redis_url)


def test_caas_is_on_by_default(prefix: str) -> None:
    config = parse_config(base_config(prefix))
    assert [type(e) for e in load_extensions(config)] == [CaaS]
