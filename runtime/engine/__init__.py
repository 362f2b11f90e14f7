"""The engine: every active actor of a node on one asyncio event loop.

``engine`` and ``cell`` (mailboxes, activation, passivation, pulses), the durable
timer ``scheduler`` and the ``outbox`` dispatcher (the activity ledger), both on
``duequeue``, and per-principal ``quotas``. The engine serves whatever shards it is
told it owns; deciding that is the cluster's job.
"""

__all__ = [
    "cell",
    "duequeue",
    "engine",
    "outbox",
    "quotas",
    "scheduler",
]
