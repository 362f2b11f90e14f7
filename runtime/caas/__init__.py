"""Commitment-as-a-Service: promises kept by actors.

A commitment is an actor of the built-in type ``commitment``: a trigger, an
obligation (an HTTP delivery), a retry policy, an optional expiry and an optional
``dedup_key``. Every state transition is a committed transaction before anything is
sent, so a commitment survives the death of every process that heard it.

==============  ==============================================================
``models``      the JSON contract (pydantic): what is sent and what is answered
``filters``     event payload matching (``field``, ``field_gte``, ``field_in``...)
``actor``       the ``commitment`` actor (state machine) and the per-principal
                event bus actors that fan events out
``index``       listing, status counts and dedup keys in Redis
``delivery``    Standard Webhooks signing of deliveries
``plugin``      the ``commitments`` plugin: signed deliveries, index updates
``api``         the ``/v1/commitments`` and ``/v1/events`` HTTP endpoints
``client``      a Python client of those endpoints (sync and asyncio)
``extension``   :class:`CaaS`, which hosts all of the above on every node
==============  ==============================================================

CaaS uses only the public runtime (:mod:`troth`, :mod:`troth.extension`, the plugin
protocol and the HTTP helpers of :mod:`troth.edge.http_api`); the runtime never
imports it.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from troth.caas.extension import CaaS


def __getattr__(name: str) -> Any:
    """``CaaS`` is imported when asked for: a program that only uses
    :mod:`troth.caas.client` does not load the node's HTTP stack."""
    if name == "CaaS":
        from troth.caas.extension import CaaS

        return CaaS
    raise AttributeError(f"module 'troth.caas' has no attribute {name!r}")


__all__ = ["CaaS"]
