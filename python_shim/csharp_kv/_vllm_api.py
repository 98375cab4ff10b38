"""The one place the connector imports vLLM's base types from (vLLM, or the test fake). Version
differences are handled where they matter: resumed requests in scheduled_new_reqs (MR V2) or in
resumed_req_ids (MR V1), handle_preemptions' argument (ignored: stores never outlive a step), and the
tensor layout (read from each tensor's shape and strides)."""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
