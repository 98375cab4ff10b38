import pytest

from csharp_kv.config import ConfigError, ShimConfig


def test_defaults(tmp_path):
    cfg = ShimConfig.from_extra_config({"socket_path": str(tmp_path / "s.sock")}, 16)
    assert cfg.chunk_tokens == 256 and not cfg.async_load and cfg.store_output


def test_missing_socket_directory_is_accepted(tmp_path):
    # systemd removes RuntimeDirectory while the sidecar is stopped: the engine must start and run uncached.
    path = str(tmp_path / "not-yet" / "s.sock")
    assert ShimConfig.from_extra_config({"socket_path": path}, 16).socket_path == path


@pytest.mark.parametrize("extra,message", [
    ({"chunk_tokens": 100}, "multiple of the block size 16"),
    ({"chunk_tokens": -16}, "positive integer"),
    ({"socket_path": "/tmp/" + "x" * 120}, "longer than 107"),
    ({"lookup_wait_ms": "soon"}, "not a number"),
    ({"transfer_timeout_ms": 0}, "at least"),
    ({"async_load": "maybe"}, "true or false"),
    ({"sockt_path": "/tmp/x"}, "unknown kv_connector_extra_config keys"),
])
def test_misconfiguration_says_what_to_change(tmp_path, extra, message):
    extra = {"socket_path": str(tmp_path / "s.sock"), **extra}
    with pytest.raises(ConfigError, match=message):
        ShimConfig.from_extra_config(extra, 16)


def test_connector_refuses_bad_chunk_size_at_startup(tmp_path):
    from vllm.config import CacheConfig, VllmConfig
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from csharp_kv.vllm.connector import CSharpSidecarConnector

    kvt = KVTransferConfig(kv_connector="csharp-sidecar", kv_role="kv_both",
                           kv_connector_extra_config={"socket_path": str(tmp_path / "s.sock"), "chunk_tokens": 24})
    with pytest.raises(ConfigError, match="multiple of the block size"):
        CSharpSidecarConnector(VllmConfig(cache_config=CacheConfig(block_size=16), kv_transfer_config=kvt),
                               KVConnectorRole.SCHEDULER, None)
