"""The cluster: which node serves which shard, and getting a call there.

``leases`` claims, renews, hands off and fences shard leases; ``routing`` runs a call
on the owner of its actor's shard, here or forwarded (signed) to another node, and
retries across handoffs under the call's request id.
"""

__all__ = [
    "leases",
    "routing",
]
