"""polls: a user application hosted by every node, through troth's extension interface.

Enable it next to Commitment-as-a-Service in the configuration::

    "extensions": ["troth.caas:CaaS", "examples.polls.extension:Polls"]

It brings everything an application needs, with nothing in ``types``:

* the ``poll`` actor type (one actor per poll: its options and votes);
* HTTP routes, served with the node's own authentication, body limit and errors:
  ``PUT /v1/polls/{poll_id}`` opens a poll, ``POST /v1/polls/{poll_id}/votes`` votes,
  ``GET /v1/polls/{poll_id}`` reads the tally;
* a ``polls`` section in ``troth status`` (how many polls exist).

Each principal has its own polls: ``poll/PRINCIPAL-POLL_ID``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import redis
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

import troth
from troth.core.keys import KeySpace
from troth.edge.http_api import Principal, body_schema, json_body
from troth.extension import Extension, NodeContext


class Poll(troth.CA):
    state_version = "1.0.0"

    def open(self, question: str, options: list[str]) -> dict[str, Any]:
        if self.state:
            raise troth.AppError("this poll is already open")
        self.state.update(question=question, votes=dict.fromkeys(options, 0))
        return self.results()

    def vote(self, option: str) -> dict[str, Any]:
        votes = self.state.get("votes", {})
        if option not in votes:
            raise troth.AppError(f"no option {option!r}", data={"options": sorted(votes)})
        votes[option] += 1
        return self.results()

    def results(self) -> dict[str, Any]:
        if not self.state:
            raise troth.NotFoundError(f"no poll {self.name.id!r}")
        return {"question": self.state["question"], "votes": dict(self.state["votes"])}


class PollIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=500)
    options: list[str] = Field(min_length=2, max_length=20)


class VoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    option: str = Field(min_length=1, max_length=100)


def _poll(who: str | None, poll_id: str) -> troth.ActorName:
    return troth.ActorName.of("poll", f"{who or 'local'}-{poll_id}")


class Polls(Extension):
    name: ClassVar[str] = "polls"

    def actor_types(self) -> Mapping[str, type[troth.CA]]:
        return {"poll": Poll}

    def routes(self, node: NodeContext) -> APIRouter:
        api = APIRouter(prefix="/v1/polls", tags=["polls"])

        async def call(who: str | None, poll_id: str, method: str, *args: Any) -> Any:
            return await node.call(
                _poll(who, poll_id), method, list(args), {}, None, troth.Caller(who)
            )

        @api.put("/{poll_id}", openapi_extra=body_schema(PollIn))
        async def open_poll(poll_id: str, request: Request, who: Principal) -> Any:
            body = await json_body(request, PollIn)
            return await call(who, poll_id, "open", body.question, body.options)

        @api.post("/{poll_id}/votes", openapi_extra=body_schema(VoteIn))
        async def vote(poll_id: str, request: Request, who: Principal) -> Any:
            body = await json_body(request, VoteIn)
            return await call(who, poll_id, "vote", body.option)

        @api.get("/{poll_id}")
        async def results(poll_id: str, who: Principal) -> Any:
            return await call(who, poll_id, "results")

        return api

    def status(self, client: redis.Redis, keys: KeySpace) -> dict[str, Any]:
        polls = sum(
            1
            for shard in range(keys.shard_count)
            for _ in client.sscan_iter(keys.shard(shard).actors, match="poll/*", count=1000)
        )
        return {"polls": polls}
