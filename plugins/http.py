"""``self.plugins.http``: outbound HTTP requests (webhooks), through the outbox.

``post(url, json=..., ...)`` (or ``request(method, url, ...)``) buffers a request;
it is committed with the actor's state and sent after the commit. Every
attempt carries the same ``Idempotency-Key`` header (the entry id unless given),
so a receiver that de-duplicates on it applies the effect once even when a crash
forces a repeat.

Outcomes: 2xx succeeds; timeouts, connection errors, 408, 429 and 5xx are retried
per the retry policy (default 0s, 5s, 25s, 125s, 625s); any other status fails at
once. With ``idempotent=False`` an attempt whose outcome a crash hid is **not**
repeated: it is reported ``uncertain`` instead. ``on_result="method"`` hands the
final outcome back to the actor.

Targets must be http or https. Loopback, private, link-local and other
non-public addresses are refused unless the settings allow them, the connection
goes to the very address that was checked, redirects are not followed, and
framing and hop-by-hop headers cannot be set (:mod:`troth.plugins.outbound`), so an actor
cannot be steered into the node's own network.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from troth.core.names import ActorName
from troth.core.plugin import (
    ActorPlugin,
    ExecutionOutcome,
    OutboxPlugin,
    PluginContext,
    PluginFactory,
)
from troth.core.records import OutboxEntry
from troth.core.retry import RetryPolicy
from troth.plugins.outbound import (
    AddressPolicy,
    OutboundClient,
    check_headers,
    check_url,
    outcome_of,
)


class HttpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout_seconds: float = Field(10.0, gt=0, le=300)
    allow_loopback: bool = Field(False, description="Allow 127.0.0.0/8 and ::1 targets.")
    allow_private: bool = Field(False, description="Allow private and link-local targets.")
    max_response_bytes: int = Field(65_536, ge=0, description="Response body kept in results.")
    user_agent: str = "troth"


class Http(OutboxPlugin):
    kind: ClassVar[str] = "http"
    max_per_txn: ClassVar[int] = 100

    def post(self, url: str, json: Any = None, **options: Any) -> str:
        return self.request("POST", url, json=json, **options)

    def request(
        self,
        method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"],
        url: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        idempotent: bool = True,
        on_result: str | None = None,
        tag: str | None = None,
        retry: RetryPolicy | dict[str, Any] | None = None,
        delay_seconds: float = 0.0,
    ) -> str:
        """Buffer a request; returns its entry id. See the module docstring."""
        if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise ValueError(f"unsupported HTTP method {method!r}")
        check_url(url)
        hdrs = check_headers(dict(headers or {}))
        return self._enqueue(
            {
                "method": method,
                "url": url,
                "json": json,
                "headers": hdrs,
                "tag": tag,
                "idempotent": idempotent,
            },
            idempotency_key=idempotency_key,
            retry=retry,
            on_result=on_result,
            delay_seconds=delay_seconds,
        )


class HttpExecutor:
    """Sends ``http`` entries; an entry made with ``idempotent=False`` is not repeated."""

    kind = "http"
    idempotent = True

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        policy = AddressPolicy(settings.allow_loopback, settings.allow_private)
        self.client = OutboundClient(
            policy,
            settings.timeout_seconds,
            settings.user_agent,
            max_response_bytes=settings.max_response_bytes,
        )

    async def execute(self, entry: OutboxEntry) -> ExecutionOutcome:
        spec = entry.spec
        headers = {**spec.get("headers", {}), "idempotency-key": entry.idempotency_key}
        resp = await self.client.attempt(
            spec["method"],
            spec["url"],
            json=spec.get("json"),
            headers=headers,
            repeatable=spec.get("idempotent", True) is not False,
        )
        if isinstance(resp, ExecutionOutcome):
            return resp
        return outcome_of(resp.status_code, resp.body.decode(errors="replace"))


class HttpFactory(PluginFactory):
    name: ClassVar[str] = "http"
    settings_model = HttpSettings

    def __init__(self, context: PluginContext, settings: dict[str, Any]) -> None:
        super().__init__(context, settings)
        self._executor = HttpExecutor(self.settings)

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Http(actor, pstate)

    def executors(self) -> list[Any]:
        return [self._executor]

    async def aclose(self) -> None:
        await self._executor.client.aclose()
