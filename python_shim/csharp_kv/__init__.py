"""Thin Python side of kvsidecar: the wire protocol, a socket client, and the vLLM connector.

All caching logic (hashing, lookup, leases, tiers, copies) lives in the C# sidecar; this package
translates engine calls into protocol frames and back.
"""

__version__ = "0.1.0"
