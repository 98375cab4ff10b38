"""``CSharpSidecarConnector``: vLLM's KV connector for the kvsidecar daemon (short name ``csharp-sidecar``).

It forwards: the scheduler role asks the sidecar what is cached and plans loads and stores; the worker
role registers its KV tensors and has the sidecar copy chunks into and out of them. Every sidecar
failure is a cache miss or a "recompute these blocks", never an exception into vLLM.

Extra config (``kv_transfer_config.kv_connector_extra_config``), see :class:`csharp_kv.config.ShimConfig`:
``socket_path``, ``chunk_tokens``, ``lookup_wait_ms``, ``lookup_timeout_ms``, ``transfer_timeout_ms``,
``connect_timeout_ms``, ``retry_interval_ms``, ``send_timeout_ms``, ``async_load``, ``model_id``, ``kv_dtype``,
``store_output``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from .. import memory
from .._vllm_api import KVConnectorBase_V1, KVConnectorRole
from ..config import ShimConfig
from .metadata import CSharpSidecarMetadata
from .scheduler import SchedulerSide
from .worker import WorkerSide

logger = logging.getLogger(__name__)


def _kv_spec(kv_cache_config) -> tuple:
    """The single full-attention (or MLA) spec, or a reason why this model is not supported."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    if len(groups) != 1:
        return None, f"{len(groups)} KV cache groups (hybrid models are not supported yet)"
    spec = groups[0].kv_cache_spec
    kind = type(spec).__name__
    if kind not in ("FullAttentionSpec", "MLAAttentionSpec"):
        return None, f"KV cache spec {kind} is not supported (full attention and MLA are)"
    return memory.KvSpec(spec.block_size, spec.num_kv_heads, spec.head_size, use_mla=kind == "MLAAttentionSpec"), None


def _tp_rank(vllm_config) -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank  # noqa: PLC0415
        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - not initialised (tests) or an older vLLM
        pc = vllm_config.parallel_config
        return int(getattr(pc, "rank", 0)) % max(1, int(pc.tensor_parallel_size))


class CSharpSidecarConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        kvt = vllm_config.kv_transfer_config
        block_size = int(vllm_config.cache_config.block_size)
        # Misconfiguration fails here, at start-up, with a message that says what to change.
        self._cfg = ShimConfig.from_extra_config(kvt.kv_connector_extra_config, block_size)
        instance = str(getattr(kvt, "engine_id", None) or "default")
        version = _vllm_version()
        spec, reason = _kv_spec(kv_cache_config)
        self._scheduler: Optional[SchedulerSide] = None
        self._worker: Optional[WorkerSide] = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self._cfg, instance, block_size, version)
            if reason:
                logger.warning("kvsidecar: the KV cache is off for this engine: %s", reason)
        elif role == KVConnectorRole.WORKER:
            tp = int(vllm_config.parallel_config.tensor_parallel_size)
            self._worker = WorkerSide(self._cfg, instance, _tp_rank(vllm_config), tp, str(vllm_config.model_config.model),
                                      spec, version, disabled_reason=reason)
        else:
            raise ValueError(f"unknown connector role {role!r}")

    # ---------------------------------------------------------------- properties

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a preempted request is recomputed

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> Optional[str]:
        return None  # any layout: the sidecar reads strides from each tensor

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict) -> bool:
        return False  # the per-layer hooks do nothing, so full CUDA graphs stay possible

    # ---------------------------------------------------------------- scheduler role

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        try:
            return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        except Exception:  # noqa: BLE001 - never an exception into vLLM
            logger.exception("kvsidecar: lookup failed; treating %s as a miss", getattr(request, "request_id", "?"))
            return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        try:
            self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)
        except Exception:  # noqa: BLE001
            logger.exception("kvsidecar: update_state_after_alloc failed for %s", request.request_id)

    def build_connector_meta(self, scheduler_output) -> CSharpSidecarMetadata:
        try:
            return self._scheduler.build_connector_meta(scheduler_output)
        except Exception:  # noqa: BLE001
            logger.exception("kvsidecar: build_connector_meta failed; no transfers this step")
            return CSharpSidecarMetadata()

    def request_finished(self, request, block_ids):
        try:
            return self._scheduler.request_finished(request, block_ids)
        except Exception:  # noqa: BLE001
            logger.exception("kvsidecar: request_finished failed for %s", request.request_id)
            return False, None

    def on_new_request(self, request) -> None:
        try:
            self._scheduler.on_new_request(request)
        except Exception:  # noqa: BLE001
            logger.exception("kvsidecar: on_new_request failed for %s", getattr(request, "request_id", "?"))

    def update_connector_output(self, connector_output) -> None:
        try:
            self._scheduler.update_connector_output(connector_output)
        except Exception:  # noqa: BLE001
            logger.exception("kvsidecar: update_connector_output failed")

    # ---------------------------------------------------------------- worker role

    def register_kv_caches(self, kv_caches) -> None:
        try:
            self._worker.register_kv_caches(kv_caches)
        except Exception:  # noqa: BLE001
            logger.exception("kvsidecar: registering the KV cache failed; running without it")

    def bind_connector_metadata(self, connector_metadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # vLLM frees a preempted request's blocks at once (no request_finished), and the forward that follows
        # may overwrite them: the stores still reading them must end first. Bound runs before every forward in
        # every runner version; preemption is rare, so this almost never waits.
        if self._worker is not None and isinstance(connector_metadata, CSharpSidecarMetadata) and connector_metadata.preempted:
            try:
                self._worker.wait_for_stores_of(connector_metadata.preempted)
            except Exception:  # noqa: BLE001
                logger.exception("kvsidecar: waiting for the stores of preempted requests failed")

    def handle_preemptions(self, *args: Any, **kwargs: Any) -> None:
        # Handled in bind_connector_metadata, which every runner calls before the forward.
        return None

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._connector_metadata if isinstance(self._connector_metadata, CSharpSidecarMetadata) else None
        try:
            self._worker.start_load_kv(meta)
        except Exception:  # noqa: BLE001
            logger.exception("kvsidecar: start_load_kv failed")

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        meta = self._connector_metadata if isinstance(self._connector_metadata, CSharpSidecarMetadata) else None
        try:
            self._worker.wait_for_save(meta)
        except Exception:  # noqa: BLE001
            logger.exception("kvsidecar: wait_for_save failed; this step's chunks are not cached")

    def get_finished(self, finished_req_ids):
        try:
            return self._worker.get_finished(finished_req_ids)
        except Exception:  # noqa: BLE001
            logger.exception("kvsidecar: get_finished failed")
            return None, None

    def get_transfer_results(self, finished_req_ids):
        """Newest vLLM: finished and failed transfers per request (get_finished is no longer called there)."""
        try:
            return self._worker.get_transfer_results(finished_req_ids)
        except Exception:  # noqa: BLE001
            logger.exception("kvsidecar: get_transfer_results failed")
            from .._vllm_api import KVConnectorTransferResults  # noqa: PLC0415
            return KVConnectorTransferResults()

    def get_block_ids_with_load_errors(self) -> set:
        return self._worker.get_block_ids_with_load_errors() if self._worker else set()

    # ---------------------------------------------------------------- both

    def stats(self) -> dict:
        """The connector's counters (and its client's): lookups, hits, loads, errors, reconnects, timeouts."""
        side = self._scheduler or self._worker
        out = dict(side.stats)
        out.update({f"client_{k}": v for k, v in vars(side.client.counters).items()})
        return out

    def get_kv_connector_stats(self):
        return None  # vLLM's KVConnectorStats has no generic form; read stats() instead

    def shutdown(self) -> None:
        side = self._scheduler or self._worker
        if side is not None:
            side.shutdown()


# Also reachable as kv_connector "csharp-sidecar" with kv_connector_module_path "csharp_kv.vllm.connector".
globals()["csharp-sidecar"] = CSharpSidecarConnector

__all__ = ["CSharpSidecarConnector"]


def _vllm_version() -> str:
    try:
        import vllm  # noqa: PLC0415
        return str(getattr(vllm, "__version__", ""))
    except Exception:  # noqa: BLE001
        return ""
