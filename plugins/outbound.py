"""What troth sends to the outside world: which targets and headers it accepts, and an
HTTP client that connects only to addresses it checked.

Webhooks and commitment deliveries go to URLs that tenants choose, so every rule
here is enforced by troth, not left to the tenant:

* **targets** are ``http``/``https`` URLs with a host (:func:`check_url`, at the
  time the effect is buffered or the commitment created);
* **addresses**: :func:`guarded_client` resolves the host itself when it opens a
  connection, refuses the connection if *any* resolved address is not allowed, and
  connects to the address it checked, so DNS rebinding between a check and the
  connect is impossible. Unspecified addresses (``0.0.0.0``, ``::``) count as
  loopback, because connecting to them reaches this host; IPv4-mapped, NAT64 and
  6to4 IPv6 addresses count as the IPv4 address they carry; Teredo counts as
  private. No proxy from the environment is used and redirects are not followed;
* **headers** a tenant may set are checked at creation (:func:`check_headers`):
  RFC 9110 token names, printable ASCII values, and never the framing, routing or
  hop-by-hop headers (``Host``, ``Content-Length``, ``Transfer-Encoding``,
  ``Connection``...) nor the ones troth signs (``webhook-*``, ``Idempotency-Key``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any, Literal
from urllib.parse import urlsplit

import httpcore
import httpx

from troth.core.plugin import ExecutionOutcome

MAX_URL = 2048
MAX_HEADERS = 20
MAX_HEADER_NAME = 100
MAX_HEADER_VALUE = 4096

#: Headers troth owns: framing, routing, hop-by-hop, and what it signs or sets itself.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "content-type",
        "content-encoding",
        "idempotency-key",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "user-agent",
    }
)
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VALUE = re.compile(r"^[\x20-\x7e\t]*$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

AddressKind = Literal["public", "private", "loopback"]


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


def attempt(
    client: httpx.Client, method: str, url: str, **kwargs: Any
) -> httpx.Response | ExecutionOutcome:
    """One request through a :func:`guarded_client`: the response, or the outcome of a
    request that got none (refused target: final; network error or timeout: retry)."""
    try:
        return client.request(method, url, **kwargs)
    except UnsafeTargetError as exc:
        return ExecutionOutcome(ok=False, error=str(exc))
    except httpx.TimeoutException as exc:
        return ExecutionOutcome(ok=False, retryable=True, error=f"timeout: {exc!r}")
    except httpx.HTTPError as exc:
        return ExecutionOutcome(ok=False, retryable=True, error=f"{type(exc).__name__}: {exc}")


class UnsafeTargetError(ValueError):
    """The target is not one troth may send to under the node's settings."""


def check_url(url: str) -> str:
    """Validate scheme and shape; the address check happens at connect time."""
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise UnsafeTargetError(f"url must be a string of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise UnsafeTargetError(f"url {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeTargetError(f"url scheme must be http or https, not {parts.scheme!r}")
    if not parts.hostname:
        raise UnsafeTargetError(f"url {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTargetError("url must not carry credentials; use headers")
    return url


def check_headers(headers: dict[str, str]) -> dict[str, str]:
    """Raise ValueError naming the first header a tenant may not send."""
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"at most {MAX_HEADERS} headers")
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN.match(name) or len(name) > MAX_HEADER_NAME:
            raise ValueError(f"header name {name!r} is not a valid HTTP token")
        if name.lower() in RESERVED_HEADERS or name.lower().startswith("proxy-"):
            raise ValueError(f"header {name!r} is set by troth and may not be given")
        if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE or not _VALUE.match(value):
            raise ValueError(
                f"header {name!r}: value must be printable ASCII of at most "
                f"{MAX_HEADER_VALUE} characters (no CR, LF or NUL)"
            )
    return headers


def classify(address: str) -> AddressKind:
    """What connecting to ``address`` reaches (see the module docstring)."""
    addr = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        elif addr in _NAT64:
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        elif addr.sixtofour is not None:
            addr = addr.sixtofour
        elif addr.teredo is not None:
            return "private"
    if addr.is_unspecified or addr.is_loopback:
        return "loopback"
    return "public" if addr.is_global else "private"


class AddressPolicy:
    def __init__(self, allow_loopback: bool, allow_private: bool) -> None:
        self.allow_loopback = allow_loopback
        self.allow_private = allow_private

    def resolve(self, host: str, port: int) -> str:
        """The address to connect to for ``host``; every resolved address is checked."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
        addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            kind = classify(address)
            if kind == "loopback" and not self.allow_loopback:
                raise UnsafeTargetError(f"{host} resolves to loopback {address}; not allowed")
            if kind == "private" and not self.allow_private:
                raise UnsafeTargetError(f"{host} resolves to non-public {address}; not allowed")
        return addresses[0]


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves and checks the host itself, then connects to the checked address (TLS
    still verifies and sends SNI for the host name)."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        address = self.policy.resolve(host, port)
        return super().connect_tcp(address, port, timeout, local_address, socket_options)


def guarded_client(
    policy: AddressPolicy, timeout: float, user_agent: str, max_connections: int = 100
) -> httpx.Client:
    """An httpx client for tenant-chosen targets (see the module docstring)."""
    transport = httpx.HTTPTransport(trust_env=False)
    # httpx offers no public hook for the connect step; the pool it builds is replaced
    # by the same pool with a guarded network backend (tests pin this behaviour).
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=max_connections,
        max_keepalive_connections=max_connections // 5 or 1,
        keepalive_expiry=5.0,
        network_backend=_GuardedBackend(policy),
    )
    return httpx.Client(
        transport=transport,
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": user_agent},
    )
