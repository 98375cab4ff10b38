"""The one place that imports vLLM names, with feature detection for the versions we support
(engines.md section 7). Importing this module requires vLLM (or the test fake)."""

from __future__ import annotations

import inspect

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

try:  # newest versions
    from vllm.v1.request import RequestStatus  # noqa: F401
except ImportError:  # pragma: no cover
    RequestStatus = None

try:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: F401
except ImportError:  # pragma: no cover
    KVConnectorFactory = None


def handle_preemptions_takes_metadata() -> bool:
    """Newest vLLM passes the step's metadata; older versions passed a set of preempted request ids."""
    params = list(inspect.signature(KVConnectorBase_V1.handle_preemptions).parameters)
    return len(params) >= 2 and params[1] in ("kv_connector_metadata", "connector_metadata")


def is_preempted(request) -> bool:
    status = getattr(request, "status", None)
    return RequestStatus is not None and status == getattr(RequestStatus, "PREEMPTED", object())
