"""Fake ``KVCacheBlocks`` and a thin ``KVCacheManager`` (what ``bind_kv_cache_manager`` receives)."""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple


@dataclass
class KVCacheBlock:
    block_id: int


@dataclass
class KVCacheBlocks:
    blocks: Tuple[Sequence[KVCacheBlock], ...]

    def get_block_ids(self, allow_none: bool = False) -> Tuple[List[int], ...]:
        return tuple([b.block_id for b in group] for group in self.blocks)

    def get_unhashed_block_ids(self) -> List[int]:
        return [b.block_id for b in self.blocks[0]]

    def new_empty(self) -> "KVCacheBlocks":
        return KVCacheBlocks(tuple([] for _ in self.blocks))


class KVCacheManager:
    """The parts a connector may read: ``block_pool``, ``block_size``, a request's blocks, and usage. The
    fake scheduler owns the pool and the request -> block ids table; this object only looks at them."""

    def __init__(self, block_pool, req_to_block_ids: Dict[str, List[int]], block_size: int):
        self.block_pool = block_pool
        self.block_size = block_size
        self._req_to_block_ids = req_to_block_ids
        self.num_kv_cache_groups = 1

    def get_blocks(self, request_id: str) -> KVCacheBlocks:
        return KVCacheBlocks(([KVCacheBlock(b) for b in self._req_to_block_ids.get(request_id, [])],))

    def get_block_ids(self, request_id: str) -> Tuple[List[int], ...]:
        return (list(self._req_to_block_ids.get(request_id, [])),)

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()
