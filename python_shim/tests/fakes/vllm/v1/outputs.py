"""Fake ``KVConnectorOutput`` (engines.md 1.3; engines-drift.md 1.3 when ``FAKE_VLLM_API=newest``)."""

from dataclasses import dataclass, field
from typing import Dict, Optional, Set

from vllm import NEWEST as _NEWEST

if _NEWEST:
    @dataclass
    class KVConnectorOutput:
        finished_sending: Optional[Set[str]] = None
        finished_recving: Optional[Set[str]] = None
        kv_connector_stats: object = None
        kv_cache_events: object = None
        kv_connector_worker_meta: object = None
        invalid_block_ids: Set[int] = field(default_factory=set)
        # Receive failures keyed by request identity (unambiguous where numeric block ids overlap).
        failed_recving: Set[str] = field(default_factory=set)
        expected_finished_count: int = 0
        prefix_replay_checkpoints: Dict[str, tuple] = field(default_factory=dict)

        def is_empty(self) -> bool:
            return not (self.finished_sending or self.finished_recving or self.kv_connector_stats
                        or self.kv_cache_events or self.invalid_block_ids or self.kv_connector_worker_meta
                        or self.prefix_replay_checkpoints or self.failed_recving)
else:
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
