"""The chunk-key hash chain of docs/hashing.md, for tests and tools. The sidecar computes keys itself;
the shim sends token ids."""

from __future__ import annotations

import hashlib
import struct
from typing import List, Sequence

TAG = "kvsidecar/namespace/v1"


def _s(value: str) -> bytes:
    b = value.encode("utf-8")
    return struct.pack("<I", len(b)) + b


def encode_namespace(model_id: str, kv_dtype: str, layout_fingerprint: str, block_tokens: int, chunk_tokens: int,
                     tp_size: int, tp_rank: int, kv_group: int, format_version: int, cache_salt: str = "") -> bytes:
    return (_s(TAG) + _s(model_id) + _s(kv_dtype) + _s(layout_fingerprint)
            + struct.pack("<6i", block_tokens, chunk_tokens, tp_size, tp_rank, kv_group, format_version)
            + _s(cache_salt or ""))


def root_key(namespace_encoding: bytes) -> bytes:
    return hashlib.sha256(namespace_encoding).digest()


def chunk_keys(root: bytes, chunk_tokens: int, tokens: Sequence[int]) -> List[bytes]:
    """Keys of the full chunks: k_i = SHA-256(k_{i-1} || u32le tokens of chunk i)."""
    keys, prev = [], root
    for c in range(len(tokens) // chunk_tokens):
        chunk = tokens[c * chunk_tokens:(c + 1) * chunk_tokens]
        prev = hashlib.sha256(prev + struct.pack("<%dI" % chunk_tokens, *chunk)).digest()
        keys.append(prev)
    return keys
