"""The per-step hand-off from the scheduler-role connector to the workers: small and pickle-safe
(token ids and block ids as bytes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .._vllm_api import KVConnectorMetadata


@dataclass
class LoadOp:
    """Copy chunks [first_chunk, first_chunk + num_chunks) into these blocks (-1: leave the block alone)."""

    req_id: str
    cache_salt: Optional[str]
    tokens: bytes          # u32le, at least (first_chunk + num_chunks) * chunk_tokens ids
    first_chunk: int
    num_chunks: int
    block_ids: bytes       # i32le, num_chunks * blocks_per_chunk
    lease_id: int
    is_async: bool


@dataclass
class StoreOp:
    """Copy chunks [first_chunk, first_chunk + num_chunks) out of these blocks into the sidecar.

    ``tokens`` holds the request's token ids from chunk ``tokens_from_chunk`` up to the last chunk named: the
    whole prefix (0) for a request's first store, and only the new chunks' tokens afterwards (the workers keep
    the earlier ones), so the traffic per request is linear in its length."""

    req_id: str
    cache_salt: Optional[str]
    tokens: bytes
    first_chunk: int
    num_chunks: int
    block_ids: bytes
    tokens_from_chunk: int = 0


@dataclass
class CSharpSidecarMetadata(KVConnectorMetadata):
    loads: List[LoadOp] = field(default_factory=list)
    stores: List[StoreOp] = field(default_factory=list)
    preempted: List[str] = field(default_factory=list)
