"""Fake ``KVConnectorOutput``."""

from dataclasses import dataclass, field
from typing import Optional, Set


@dataclass
class KVConnectorOutput:
    finished_sending: Optional[Set[str]] = None
    finished_recving: Optional[Set[str]] = None
    kv_connector_stats: object = None
    kv_cache_events: object = None
    kv_connector_worker_meta: object = None
    invalid_block_ids: Set[int] = field(default_factory=set)
    expected_finished_count: int = 0

    def is_empty(self) -> bool:
        return not (self.finished_sending or self.finished_recving or self.kv_connector_stats
                    or self.kv_cache_events or self.invalid_block_ids or self.kv_connector_worker_meta)
