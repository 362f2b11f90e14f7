"""The transactional core: one message, one transaction, one atomic commit.

What an actor is (``actor``), who may call what (``access``), the transaction
protocol (``transaction``), the checkpoint store and the Lua scripts of every
atomic step (``checkpoint``, ``scripts``, ``lua/``), the group round trips to
Redis (``batcher``), the plugin protocol and the records a commit carries
(``plugin``, ``records``, ``retry``), and the vocabulary everything above shares:
``clock``, ``config``, ``catalog``, ``names``, ``keys``, ``errors``, ``codec``,
``jsonsafe``, ``metrics``, ``redis_clients``, ``versioning``, ``aio``, and what
observability needs (``logcontext``, ``tracing``). Nothing
here knows about nodes, shards changing hands or HTTP.
"""

__all__ = [
    "access",
    "actor",
    "aio",
    "batcher",
    "catalog",
    "checkpoint",
    "clock",
    "codec",
    "config",
    "errors",
    "jsonsafe",
    "keys",
    "logcontext",
    "metrics",
    "names",
    "plugin",
    "records",
    "redis_clients",
    "retry",
    "scripts",
    "tracing",
    "transaction",
    "versioning",
]
