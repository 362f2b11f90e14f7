"""The edge: how people and programs reach a node.

The HTTP API (``http_api``), WebSocket sessions and their notifications
(``sessions``, ``notify_hub``), the server on the node's loop (``server``), the
``troth`` command (``cli``, ``logs``, ``supervisor`` for ``--nodes N``), the operator
reads that need no node (``admin``) and the embedded Redis (``embedded_redis``).
"""

__all__ = [
    "admin",
    "cli",
    "embedded_redis",
    "http_api",
    "logs",
    "notify_hub",
    "server",
    "sessions",
    "supervisor",
]
