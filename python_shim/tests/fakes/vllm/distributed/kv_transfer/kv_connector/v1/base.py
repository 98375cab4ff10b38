"""Fake ``vllm.distributed.kv_transfer.kv_connector.v1.base``: the signatures and the abstract set of
engines.md 1.1-1.2 (``FAKE_VLLM_API=v029``) or engines-drift.md 1.1-1.2 (``FAKE_VLLM_API=newest``), copied
by hand. Members that one version lacks are absent, not stubs: ``hasattr`` and ``import`` tell them apart
as they would against the real vLLM."""

import enum
import logging
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Literal, Optional

from vllm import NEWEST as _NEWEST

if _NEWEST:
    from contextlib import AbstractContextManager
    from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

CopyBlocksOp = Callable[[dict, dict, list, list, Literal["h2d", "d2h"]], None]

if _NEWEST:
    @dataclass
    class KVConnectorTransferResults:
        """Per-step transfer results of a worker (newest only). Failed receives also appear in
        ``finished_recving`` so the scheduler can release the request from its transfer wait state."""

        finished_sending: set = field(default_factory=set)
        finished_recving: set = field(default_factory=set)
        failed_recving: set = field(default_factory=set)
        prefix_replay_checkpoints: dict = field(default_factory=dict)


class KVConnectorRole(enum.Enum):
    SCHEDULER = 0
    WORKER = 1


class KVConnectorHandshakeMetadata(ABC):  # noqa: B024
    pass


class KVConnectorMetadata(ABC):  # noqa: B024
    pass


class KVConnectorWorkerMetadata(ABC):
    @abstractmethod
    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "KVConnectorWorkerMetadata": ...


class SupportsHMA(ABC):
    @abstractmethod
    def request_finished_all_groups(self, request, block_ids): ...


def supports_hma(connector: Any) -> bool:
    if isinstance(connector, type):
        return issubclass(connector, SupportsHMA)
    return isinstance(connector, SupportsHMA)


class KVConnectorBase_V1(ABC):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config):
        logger.warning("Initializing KVConnectorBase_V1. This API is experimental and subject to change.")
        self._connector_metadata: Optional[KVConnectorMetadata] = None
        self._vllm_config = vllm_config
        if vllm_config.kv_transfer_config is None:
            raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
        self._kv_transfer_config = vllm_config.kv_transfer_config
        self._kv_cache_config = kv_cache_config
        self._role = role
        if _NEWEST:
            self._kv_cache_manager = None
        else:
            self.use_eagle_prefix_cache_hashing = False

    @property
    def role(self) -> KVConnectorRole:
        return self._role

    if _NEWEST:
        @property
        def supports_divergent_local_hybrid_hits(self) -> bool:
            return False
    else:
        @property
        def prefer_cross_layer_blocks(self) -> bool:
            return False

        @property
        def supports_eagle_prefix_cache_hashing(self) -> bool:
            return False

        def set_eagle_prefix_cache_hashing(self, enabled: bool) -> None:
            self.use_eagle_prefix_cache_hashing = enabled

    @property
    def requires_kv_delivery(self) -> bool:
        return self._kv_transfer_config.is_kv_producer

    if _NEWEST:
        def get_mem_pool_context(self) -> "Optional[AbstractContextManager]":
            """A custom KV cache allocation context; None uses the engine's default memory pool."""
            return None

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        self._connector_metadata = connector_metadata

    def clear_connector_metadata(self) -> None:
        self._connector_metadata = None

    def _get_connector_metadata(self) -> KVConnectorMetadata:
        assert self._connector_metadata is not None
        return self._connector_metadata

    def has_connector_metadata(self) -> bool:
        return self._connector_metadata is not None

    def register_kv_caches(self, kv_caches: dict) -> None:
        return

    if not _NEWEST:
        def register_cross_layers_kv_cache(self, kv_cache, attn_backend) -> None:
            return

    def set_host_xfer_buffer_ops(self, copy_operation: CopyBlocksOp) -> None:
        return

    if _NEWEST:
        def finish_forward(self) -> None:
            """Notify the connector that the model no longer reads this step's KV."""
            return None

        def reset_capture_state(self) -> None:
            """Reset worker state mutated while capturing CUDA graphs."""
            return None

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        return

    @abstractmethod
    def start_load_kv(self, forward_context, **kwargs: Any) -> None: ...

    @abstractmethod
    def wait_for_layer_load(self, layer_name: str) -> None: ...

    @abstractmethod
    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None: ...

    @abstractmethod
    def wait_for_save(self) -> None: ...

    def get_finished(self, finished_req_ids: set) -> tuple:
        return None, None

    if _NEWEST:
        def get_transfer_results(self, finished_req_ids: set) -> "KVConnectorTransferResults":
            finished_sending, finished_recving = self.get_finished(finished_req_ids)
            return KVConnectorTransferResults(finished_sending=set(finished_sending or ()),
                                              finished_recving=set(finished_recving or ()))

    def get_block_ids_with_load_errors(self) -> set:
        return set()

    def shutdown(self) -> None:
        return None

    def get_kv_connector_stats(self):
        return None

    def get_kv_connector_kv_cache_events(self):
        return None

    def get_handshake_metadata(self):
        return None

    def build_connector_worker_meta(self):
        return None

    if _NEWEST:
        def bind_kv_cache_manager(self, kv_cache_manager) -> None:
            self._kv_cache_manager = kv_cache_manager
            self.bind_gpu_block_pool(kv_cache_manager.block_pool)

    def bind_gpu_block_pool(self, gpu_block_pool) -> None:
        return None

    @abstractmethod
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple: ...

    @abstractmethod
    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None: ...

    @abstractmethod
    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata: ...

    def on_new_request(self, request) -> None:
        return None

    def update_connector_output(self, connector_output) -> None:
        return None

    if _NEWEST:
        def can_load_prefix_replay_checkpoint(self, request, num_local_tokens: int, num_external_tokens: int) -> bool:
            return False

        def consume_prefix_replay_checkpoint(self, request, num_hit_tokens: int) -> bool:
            return False

    def request_finished(self, request, block_ids: list) -> tuple:
        return False, None

    if _NEWEST:
        def register_finished_partial_tail(self, request, block_ids: tuple, partial_tail_offloads: list) -> bool:
            return False

    def take_events(self) -> Iterable:
        return ()

    if _NEWEST:
        def has_pending_block_frees(self) -> bool:
            """Whether pending transfers can release blocks instead of preemption."""
            return False

    def has_pending_push_work(self) -> bool:
        return False

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> Optional[str]:
        if cls is KVConnectorBase_V1:
            raise TypeError("get_required_kvcache_layout should not be called on the abstract base class")
        return None

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict) -> bool:
        return False

    def get_finished_count(self) -> Optional[int]:
        return None

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return None

    def set_xfer_handshake_metadata(self, metadata: dict) -> None:
        return None

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return None

    def reset_cache(self) -> Optional[bool]:
        return None
