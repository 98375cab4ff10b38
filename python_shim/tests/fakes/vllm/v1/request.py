"""Fake ``vllm.v1.request``: the fields connectors read (engines.md 1.3)."""

import enum
from typing import List, Optional


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    WAITING_FOR_FSM = enum.auto()
    WAITING_FOR_REMOTE_KVS = enum.auto()
    WAITING_FOR_STREAMING_REQ = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_IGNORED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @staticmethod
    def is_finished(status) -> bool:
        return status > RequestStatus.PREEMPTED


class Request:
    def __init__(self, request_id: str, prompt_token_ids: Optional[List[int]], sampling_params=None,
                 pooling_params=None, eos_token_id=None, client_index: int = 0, arrival_time=None,
                 prompt_embeds=None, mm_features=None, lora_request=None, cache_salt: Optional[str] = None,
                 priority: int = 0, trace_headers=None, block_hasher=None, resumable: bool = False,
                 reasoning_ended=None, max_tokens: int = 16):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.cache_salt = cache_salt
        self.lora_request = lora_request
        self.mm_features = mm_features or []
        self.priority = priority
        self.max_tokens = max_tokens
        self._all_token_ids: List[int] = list(prompt_token_ids or [])
        self.output_token_ids: List[int] = []
        self.num_prompt_tokens = len(prompt_token_ids or [])
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1
        self.num_external_computed_tokens = 0
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.kv_transfer_params = None
        self.block_hashes: list = []

    @property
    def all_token_ids(self) -> List[int]:
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)
