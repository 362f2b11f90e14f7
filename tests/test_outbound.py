"""Outbound requests go only where the settings allow, to the address that was checked."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from conftest import Receiver, wait_until
from troth.core.http1 import Response
from troth.core.names import ActorName
from troth.node import Node
from troth.plugins.outbound import (
    AddressPolicy,
    OutboundClient,
    UnsafeTargetError,
    classify,
)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("0.0.0.0", "loopback"),
        ("::", "loopback"),
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0:0:0:0:0:ffff:7f00:1", "loopback"),
        ("64:ff9b::7f00:1", "loopback"),
        ("2002:7f00:1::", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "private"),
        ("fe80::1", "private"),
        ("fc00::1", "private"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private"),  # Teredo
        ("8.8.8.8", "public"),
        ("2606:4700:4700::1111", "public"),
    ],
)
def test_addresses_count_as_what_they_reach(address: str, kind: str) -> None:
    assert classify(address) == kind


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "0", "[::ffff:127.0.0.1]", "[0:0:0:0:0:ffff:7f00:1]", "127.1", "[::]"]
)
def test_loopback_in_disguise_is_refused_with_private_allowed(host: str) -> None:
    policy = AddressPolicy(allow_loopback=False, allow_private=True)
    with pytest.raises(UnsafeTargetError):
        send(OutboundClient(policy, 2, "t"), "GET", f"http://{host}:9/")


def send(client: OutboundClient, method: str, url: str, **kwargs: Any) -> Response:
    """One request through ``client`` on a loop of its own."""

    async def go() -> Response:
        try:
            return await client.request(method, url, **kwargs)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_the_connection_goes_to_the_address_that_was_checked(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host is resolved once, by the guard, and the connection goes to the address
    it checked: ``rebind.invalid`` exists in no DNS, so a second lookup (by the HTTP
    library, as before the fix) could not even connect. Only loopback is ever contacted."""
    port = int(receiver.url.rsplit(":", 1)[1])
    lookups: list[str] = []
    real = socket.getaddrinfo

    def resolver(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.invalid":
            return real(host, *args, **kwargs)
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    allowed = AddressPolicy(allow_loopback=True, allow_private=False)
    resp = send(OutboundClient(allowed, 5, "t"), "POST", f"http://rebind.invalid:{port}/pinned")
    assert resp.status_code == 200 and receiver.requests[-1].path == "/pinned"
    assert receiver.requests[-1].headers["host"] == f"rebind.invalid:{port}"
    assert lookups == ["rebind.invalid"]
    refused = AddressPolicy(allow_loopback=False, allow_private=True)
    with pytest.raises(UnsafeTargetError):
        send(OutboundClient(refused, 5, "t"), "POST", f"http://rebind.invalid:{port}/refused")
    assert receiver.count() == 1


def test_commitment_to_disguised_loopback_fails_without_reaching_it(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    node = make_node(
        "n1",
        serve=True,
        plugins={"commitments": {"allow_loopback": False, "allow_private": True}},
    )
    import httpx

    port = receiver.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=node.url) as api:
        made = api.post(
            "/v1/commitments",
            json={
                "trigger": {"type": "time_after", "delay_seconds": 0},
                "obligation": {"target": f"http://[::ffff:127.0.0.1]:{port}/x"},
                "retry_policy": {"max_attempts": 1},
            },
        ).json()
        done = wait_until(
            lambda: (
                (c := api.get(f"/v1/commitments/{made['id']}").json())["status"] == "failed" and c
            )
        )
    assert "loopback" in done["error"]
    assert receiver.count() == 0


def test_http_plugin_refuses_reserved_headers_in_the_transaction(
    make_node: Callable[..., Node],
) -> None:
    from troth.core.errors import ActorError

    node = make_node("n1")
    probe = ActorName("probe", "alice-h")
    for headers in ({"Host": "x"}, {"X-A": "b\r\nc"}):
        with pytest.raises(ActorError, match="header"):
            node.call(probe, "headed", ["http://127.0.0.1:9/", headers]).result(5)
