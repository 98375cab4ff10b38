"""Fake ``SchedulerOutput`` and friends (engines.md 1.3; engines-drift.md 2.1 when ``FAKE_VLLM_API=newest``)."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from vllm import NEWEST as _NEWEST


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: Optional[List[int]]
    block_ids: Tuple[List[int], ...]
    num_computed_tokens: int
    mm_features: list = field(default_factory=list)
    sampling_params: object = None
    pooling_params: object = None
    lora_request: object = None
    prompt_embeds: object = None
    prefill_token_ids: Optional[List[int]] = None


@dataclass
class CachedRequestData:
    req_ids: List[str] = field(default_factory=list)
    resumed_req_ids: Set[str] = field(default_factory=set)
    new_token_ids: List[List[int]] = field(default_factory=list)
    all_token_ids: Dict[str, List[int]] = field(default_factory=dict)
    new_block_ids: List[Optional[Tuple[List[int], ...]]] = field(default_factory=list)
    num_computed_tokens: List[int] = field(default_factory=list)
    num_output_tokens: List[int] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


@dataclass
class _SchedulerOutputV029:
    scheduled_new_reqs: List[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: Dict[str, int]
    total_num_scheduled_tokens: int
    scheduled_spec_decode_tokens: Dict[str, List[int]] = field(default_factory=dict)
    scheduled_encoder_inputs: Dict[str, List[int]] = field(default_factory=dict)
    num_common_prefix_blocks: List[int] = field(default_factory=list)
    finished_req_ids: Set[str] = field(default_factory=set)
    free_encoder_mm_hashes: List[str] = field(default_factory=list)
    preempted_req_ids: Optional[Set[str]] = None
    kv_connector_metadata: object = None
    has_sync_kv_loads: bool = False


if _NEWEST:
    @dataclass
    class SchedulerOutput(_SchedulerOutputV029):
        # Newly allocated blocks the worker zeroes before the forward (never those an async load fills), and
        # (src, dst) block copies the worker applies before the forward (a local partial-tail hit).
        new_block_ids_to_zero: Optional[List[int]] = None
        kv_cache_block_copies: Optional[List[Tuple[int, int]]] = None
        kv_connector_block_state: object = None
else:
    @dataclass
    class SchedulerOutput(_SchedulerOutputV029):
        pass
