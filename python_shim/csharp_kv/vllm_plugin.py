"""vLLM general plugin: registers the short connector name ``csharp-sidecar`` in every vLLM process
(entry point group ``vllm.general_plugins``)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

NAME = "csharp-sidecar"
MODULE = "csharp_kv.vllm.connector"
CLASS = "CSharpSidecarConnector"


def register() -> None:
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: PLC0415
    except ImportError:
        return
    registry = getattr(KVConnectorFactory, "_registry", {})
    if NAME in registry:
        return  # plugins load once per process, but stay idempotent anyway
    try:
        KVConnectorFactory.register_connector(NAME, MODULE, CLASS)
    except ValueError:
        pass  # registered concurrently
