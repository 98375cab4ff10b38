import pytest


@pytest.fixture
def fresh_registry():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    saved = dict(KVConnectorFactory._registry)
    KVConnectorFactory._registry.pop("csharp-sidecar", None)
    yield KVConnectorFactory
    KVConnectorFactory._registry.clear()
    KVConnectorFactory._registry.update(saved)


def _config(tmp_path, **kvt):
    from vllm.config import VllmConfig
    from vllm.config.kv_transfer import KVTransferConfig

    kvt.setdefault("kv_connector_extra_config", {"socket_path": str(tmp_path / "none.sock"), "chunk_tokens": 64})
    return VllmConfig(kv_transfer_config=KVTransferConfig(kv_role="kv_both", **kvt))


def test_register_is_idempotent_and_resolves_the_short_name(fresh_registry, tmp_path):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from csharp_kv import vllm_plugin
    from csharp_kv.vllm.connector import CSharpSidecarConnector

    vllm_plugin.register()
    vllm_plugin.register()
    connector = fresh_registry.create_connector(_config(tmp_path, kv_connector="csharp-sidecar"), KVConnectorRole.SCHEDULER, None)
    assert isinstance(connector, CSharpSidecarConnector)
    # Sidecar absent: a miss, not an error.
    from vllm.v1.request import Request

    assert connector.get_num_new_matched_tokens(Request("r", list(range(300))), 0) == (0, False)
    connector.shutdown()


def test_module_path_with_the_hyphenated_name(fresh_registry, tmp_path):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from csharp_kv.vllm.connector import CSharpSidecarConnector

    cfg = _config(tmp_path, kv_connector="csharp-sidecar", kv_connector_module_path="csharp_kv.vllm.connector")
    connector = fresh_registry.create_connector(cfg, KVConnectorRole.SCHEDULER, None)
    assert isinstance(connector, CSharpSidecarConnector)
    assert connector.requires_kv_delivery is False
    assert CSharpSidecarConnector.requires_piecewise_for_cudagraph({}) is False
    connector.shutdown()


def test_request_without_prompt_ids_is_a_miss(fresh_registry, tmp_path):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.request import Request

    from csharp_kv.vllm.connector import CSharpSidecarConnector

    connector = CSharpSidecarConnector(_config(tmp_path, kv_connector="csharp-sidecar"), KVConnectorRole.SCHEDULER, None)
    assert connector.get_num_new_matched_tokens(Request("r", None), 0) == (0, False)
    assert connector.stats()["skipped_requests"] == 1
    connector.shutdown()


def test_hybrid_model_worker_runs_without_cache(fresh_registry, tmp_path):
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, MambaSpec

    from csharp_kv.vllm.connector import CSharpSidecarConnector

    kcc = KVCacheConfig(8, [], [KVCacheGroupSpec(["m0"], MambaSpec(16))])
    connector = CSharpSidecarConnector(_config(tmp_path, kv_connector="csharp-sidecar"), KVConnectorRole.WORKER, kcc)
    connector.register_kv_caches({"m0": torch.zeros(8, 16, 4)})
    assert connector.get_block_ids_with_load_errors() == set()
    assert connector.stats()["registrations"] == 0
    connector.shutdown()
