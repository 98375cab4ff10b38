"""Fake KV cache specs and config (engines.md 1.3)."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass(frozen=True)
class FullAttentionSpec:
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: object = None
    page_size_padded: Optional[int] = None
    head_size_v: Optional[int] = None
    sliding_window: Optional[int] = None
    attention_chunk_size: Optional[int] = None


@dataclass(frozen=True)
class MLAAttentionSpec(FullAttentionSpec):
    cache_dtype_str: Optional[str] = None


@dataclass(frozen=True)
class MambaSpec:
    block_size: int
    num_kv_heads: int = 0
    head_size: int = 0
    shapes: tuple = ()


@dataclass
class KVCacheTensor:
    size: int
    shared_by: List[str]


@dataclass
class KVCacheGroupSpec:
    layer_names: List[str]
    kv_cache_spec: object


@dataclass
class KVCacheConfig:
    num_blocks: int
    kv_cache_tensors: List[KVCacheTensor] = field(default_factory=list)
    kv_cache_groups: List[KVCacheGroupSpec] = field(default_factory=list)
