"""``self.plugins.http``: outbound HTTP requests (webhooks), through the outbox.

``post(url, json=..., ...)`` (or ``request(method, url, ...)``) buffers a request;
it is committed with the actor's state and sent with httpx after the commit. Every
attempt carries the same ``Idempotency-Key`` header (the entry id unless given),
so a receiver that de-duplicates on it applies the effect once even when a crash
forces a repeat.

Outcomes: 2xx succeeds; timeouts, connection errors, 408, 429 and 5xx are retried
per the retry policy (default 0s, 5s, 25s, 125s, 625s); any other status fails at
once. With ``idempotent=False`` an attempt whose outcome a crash hid is **not**
repeated: it is reported ``uncertain`` instead. ``on_result="method"`` hands the
final outcome back to the actor.

Targets must be http or https. Loopback, private, link-local and other
non-public addresses are refused unless the settings allow them, and redirects
are not followed, so an actor cannot be steered into the node's own network.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from troth.names import ActorName
from troth.plugin import (
    ActorPlugin,
    ExecutionOutcome,
    NodeServices,
    OutboxEntry,
    OutboxPlugin,
    PluginFactory,
    RetryPolicy,
)

RETRYABLE_STATUS = frozenset({408, 429})


def outcome_of(code: int, value: Any = None) -> ExecutionOutcome:
    """The delivery rule shared by every HTTP effect: 2xx succeeds; 408, 429 and 5xx
    are worth retrying; any other status is final."""
    if 200 <= code < 300:
        return ExecutionOutcome(ok=True, status_code=code, value=value)
    retryable = code in RETRYABLE_STATUS or code >= 500
    return ExecutionOutcome(
        ok=False, retryable=retryable, status_code=code, error=f"HTTP {code}", value=value
    )


MAX_HEADERS = 50


class HttpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout_seconds: float = Field(10.0, gt=0, le=300)
    allow_loopback: bool = Field(False, description="Allow 127.0.0.0/8 and ::1 targets.")
    allow_private: bool = Field(False, description="Allow private and link-local targets.")
    max_response_bytes: int = Field(65_536, ge=0, description="Response body kept in results.")
    user_agent: str = "troth"


class UnsafeTargetError(ValueError):
    pass


def check_url(url: str) -> str:
    """Validate scheme and shape; the address check happens at send time."""
    if not isinstance(url, str) or len(url) > 2048:
        raise UnsafeTargetError("url must be a string of at most 2048 characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeTargetError(f"url scheme must be http or https, not {parts.scheme!r}")
    if not parts.hostname:
        raise UnsafeTargetError(f"url {url!r} has no host")
    return url


def check_address(url: str, allow_loopback: bool, allow_private: bool) -> None:
    """Refuse targets that resolve to addresses the settings do not allow."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ConnectionError(f"cannot resolve {host!r}: {exc}") from exc
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if addr.is_loopback:
            if not allow_loopback:
                raise UnsafeTargetError(f"{host} resolves to loopback {addr}; not allowed")
        elif not addr.is_global and not allow_private:
            raise UnsafeTargetError(f"{host} resolves to non-public {addr}; not allowed")


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
        hdrs = {str(k): str(v) for k, v in (headers or {}).items()}
        if len(hdrs) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} headers")
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
        self.client = httpx.Client(
            timeout=settings.timeout_seconds,
            follow_redirects=False,
            headers={"user-agent": settings.user_agent},
        )

    def execute(self, entry: OutboxEntry) -> ExecutionOutcome:
        spec = entry.spec
        s = self.settings
        try:
            check_address(spec["url"], s.allow_loopback, s.allow_private)
        except UnsafeTargetError as exc:
            return ExecutionOutcome(ok=False, error=str(exc))
        except ConnectionError as exc:
            return ExecutionOutcome(ok=False, retryable=True, error=str(exc))
        headers = {**spec.get("headers", {}), "idempotency-key": entry.idempotency_key}
        try:
            resp = self.client.request(
                spec["method"], spec["url"], json=spec.get("json"), headers=headers
            )
        except httpx.TimeoutException as exc:
            return ExecutionOutcome(ok=False, retryable=True, error=f"timeout: {exc!r}")
        except httpx.HTTPError as exc:
            return ExecutionOutcome(ok=False, retryable=True, error=f"{type(exc).__name__}: {exc}")
        return outcome_of(resp.status_code, resp.text[: s.max_response_bytes])

    def close(self) -> None:
        self.client.close()


class HttpFactory(PluginFactory):
    name: ClassVar[str] = "http"
    settings_model = HttpSettings

    def __init__(self, node: NodeServices, settings: dict[str, Any]) -> None:
        super().__init__(node, settings)
        self._executor = HttpExecutor(self.settings)

    def for_actor(self, actor: ActorName, pstate: dict[str, Any]) -> ActorPlugin:
        return Http(actor, pstate)

    def executors(self) -> list[Any]:
        return [self._executor]

    def close(self) -> None:
        self._executor.close()
