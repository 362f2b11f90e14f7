"""What troth sends to the outside world: which targets and headers it accepts, and an
HTTP client that connects only to addresses it checked.

Webhooks and commitment deliveries go to URLs that tenants choose, so every rule
here is enforced by troth, not left to the tenant:

* **targets** are ``http``/``https`` URLs with a host (:func:`check_url`, at the
  time the effect is buffered or the commitment created);
* **addresses**: :class:`OutboundClient` resolves the host itself when it opens a
  connection, refuses the connection if *any* resolved address is not allowed, and
  connects to the address it checked, so DNS rebinding between a check and the
  connect is impossible; a literal address in the URL is checked as it is, and
  only in its canonical form. Unspecified addresses (``0.0.0.0``, ``::``) count as
  loopback, because connecting to them reaches this host; IPv4-mapped, NAT64 and
  6to4 IPv6 addresses count as the IPv4 address they carry; Teredo counts as
  private. No proxy from the environment is used and redirects are not followed;
* **headers** a tenant may set are checked at creation (:func:`check_headers`):
  RFC 9110 token names, printable ASCII values, and never the framing, routing or
  hop-by-hop headers (``Host``, ``Content-Length``, ``Transfer-Encoding``,
  ``Connection``...) nor the ones troth signs (``webhook-*``, ``Idempotency-Key``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import time
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from troth.core.http1 import Http1Client, Response
from troth.core.plugin import ExecutionOutcome

MAX_URL = 2048
MAX_HEADERS = 20
MAX_HEADER_NAME = 100
MAX_HEADER_VALUE = 4096
#: How long a host name's checked addresses are reused (as aiohttp's DNS cache did).
DNS_TTL = 10.0
MAX_DNS_CACHED = 4096

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


class UnsafeTargetError(ValueError):
    """The target is not one troth may send to under the node's settings."""


def check_url(url: str) -> str:
    """Validate scheme and shape; the address check happens at connect time."""
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise UnsafeTargetError(f"url must be a string of at most {MAX_URL} characters")
    problem = _url_problem(url)
    if problem is not None:
        raise UnsafeTargetError(problem)
    return url


@functools.lru_cache(maxsize=1024)
def _url_problem(url: str) -> str | None:
    """What is wrong with ``url``'s shape, if anything. Cached: a tenant sends to a few
    targets, and checking one is a dozen Python calls (its port, host and credentials
    each parse it again), on every commitment created."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        return f"url {url!r} is malformed: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"url scheme must be http or https, not {parts.scheme!r}"
    if not parts.hostname:
        return f"url {url!r} has no host"
    if parts.username is not None or parts.password is not None:
        return "url must not carry credentials; use headers"
    return None


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


@functools.lru_cache(maxsize=4096)
def classify(address: str) -> AddressKind:
    """What connecting to ``address`` reaches (see the module docstring). Cached: a
    delivery to the same target must not parse its address again."""
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

    def check(self, host: str, address: str) -> None:
        """Raise UnsafeTargetError unless connecting to ``address`` is allowed."""
        kind = classify(address)
        if kind == "loopback" and not self.allow_loopback:
            raise UnsafeTargetError(f"{host} resolves to loopback {address}; not allowed")
        if kind == "private" and not self.allow_private:
            raise UnsafeTargetError(f"{host} resolves to non-public {address}; not allowed")

    def resolve(self, host: str, port: int, family: int = 0) -> list[tuple[int, str]]:
        """Every address of ``host`` as (family, address), each one checked."""
        try:
            infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise OSError(f"cannot resolve {host!r}: {exc}") from exc
        found = [(int(info[0]), str(info[4][0])) for info in infos]
        for _, address in found:
            self.check(host, address)
        return found


@functools.lru_cache(maxsize=4096)
def _literal_address(host: str) -> str | None:
    """The address a URL's host names literally, or None for a host name. A host that
    looks like an address but is not one in canonical form (``127.1``, ``0``) is
    refused: resolvers would map it onto an address the check never saw."""
    if not (":" in host or host.replace(".", "").isdigit()):
        return None
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        raise UnsafeTargetError(f"{host!r} is not an address in canonical form") from None


class OutboundClient:
    """An HTTP client for tenant-chosen targets (see the module docstring), on the
    event loop that first uses it: :class:`~troth.core.http1.Http1Client` (a third of
    aiohttp's CPU per request, and deliveries are the hot path of the commitments
    service), connecting only to addresses :meth:`_resolve` checked. A host name's
    checked addresses are reused for ``DNS_TTL`` seconds."""

    def __init__(
        self,
        policy: AddressPolicy,
        timeout: float,
        user_agent: str,
        max_connections: int = 256,
        max_response_bytes: int = 65_536,
    ) -> None:
        self.policy = policy
        self._http = Http1Client(
            self._resolve,
            timeout=timeout,
            user_agent=user_agent,
            max_connections=max_connections,
            max_response_bytes=max_response_bytes,
        )
        self._dns: dict[tuple[str, int], tuple[float, list[tuple[int, str]]]] = {}

    async def _resolve(self, host: str, port: int) -> list[tuple[int, str]]:
        literal = _literal_address(host)
        if literal is not None:
            self.policy.check(host, literal)
            return [(socket.AF_INET6 if ":" in literal else socket.AF_INET, literal)]
        now = time.monotonic()
        cached = self._dns.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await asyncio.to_thread(self.policy.resolve, host, port)
        if len(self._dns) >= MAX_DNS_CACHED:
            self._dns.clear()
        self._dns[(host, port)] = (now + DNS_TTL, found)
        return found

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        repeatable: bool = False,
    ) -> Response:
        """Send one request; raises UnsafeTargetError for a target the policy refuses,
        OSError or TimeoutError when no response came (with the current span's
        ``traceparent``: see :class:`~troth.core.http1.Http1Client`). ``repeatable``: the receiver
        de-duplicates it, so it may be sent again when a kept-alive connection turns
        out closed (:mod:`troth.core.http1`)."""
        headers = dict(headers or {})
        if json is not None:
            content = orjson.dumps(json)
            headers.setdefault("content-type", "application/json")
        return await self._http.request(method, url, content, headers, repeatable=repeatable)

    async def attempt(self, method: str, url: str, **kwargs: Any) -> Response | ExecutionOutcome:
        """One request: the response, or the outcome of a request that got none (refused
        target or a request that cannot be sent: final; network error or timeout:
        retry)."""
        try:
            return await self.request(method, url, **kwargs)
        except ValueError as exc:  # UnsafeTargetError among them
            return ExecutionOutcome(ok=False, error=str(exc))
        except TimeoutError as exc:
            return ExecutionOutcome(ok=False, retryable=True, error=f"timeout: {exc!r}")
        except OSError as exc:
            return ExecutionOutcome(ok=False, retryable=True, error=f"{type(exc).__name__}: {exc}")

    async def aclose(self) -> None:
        await self._http.aclose()
