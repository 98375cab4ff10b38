"""Fake ``KVCacheBlocks``."""

from dataclasses import dataclass
from typing import List, Sequence, Tuple


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
