"""The one place the connector imports vLLM's base types from (vLLM, or the test fake). Version
differences are handled where they matter: resumed requests in scheduled_new_reqs (MR V2) or in
resumed_req_ids (MR V1), preempted requests (their stores end before the next forward), get_transfer_results
(newest vLLM) or get_finished (older), and the
tensor layout (read from each tensor's shape and strides)."""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

try:  # newest vLLM: per-request transfer results (failed_recving); absent up to about v0.29
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults  # noqa: F401
except ImportError:  # pragma: no cover - depends on the vLLM version
    KVConnectorTransferResults = None  # type: ignore[assignment,misc]
