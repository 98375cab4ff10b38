"""GPU engines through the CUDA data plane, on the CUDA driver double (tests/cuda_double): the fake engine's
workers keep their KV in the double's "device" memory and the real shim exports it with CUDA IPC handles and a
store event; the real sidecar process loads the double in place of libcuda.so.1, opens the handles, and copies on
its streams. The KV the forward reads is checked byte for byte, as in test_scenarios.py. Also: how the sidecar
starts with no driver, a driver without devices, or a driver it cannot load."""

import time

import pytest

from fake_engine import api as fake_api
from fake_engine.engine import EngineOptions, FakeEngine, SidecarProcess
from fake_engine.model import remove_device_memory
from fake_engine.sidecar import NOT_BUILT, SidecarStartError, read_stats, sidecar_bin


@pytest.fixture
def gpu_sidecar(cuda_double):
    if sidecar_bin() is None:
        pytest.skip(NOT_BUILT)
    s = SidecarProcess(extra_args=["--Sidecar:Gpu=required", f"--Sidecar:CudaDriverLibrary={cuda_double}"])
    yield s
    s.stop()




def prompt(n, seed):
    return [(seed * 7919 + i * 104729) % 30000 + 1000 for i in range(n)]


def run_requests(engine, requests):
    from vllm.v1.request import Request

    for req_id, prompt_ids in requests:
        engine.add(Request(req_id, prompt_ids, max_tokens=4))
    engine.run()
    assert {r for r, _ in requests} <= {r.request_id for r in engine.scheduler.finished}
    assert engine.mismatches == [], "the forward read wrong KV:\n" + "\n".join(engine.mismatches)
    assert engine.violations == [], "\n".join(engine.violations)


@pytest.mark.parametrize("era,api,async_load", [("blocks_first", "v029", False), ("kv_first", "newest", True),
                                                ("shared_views", "v029", True)])
def test_gpu_engine_cold_then_warm_loads_exact_bytes_with_one_open_per_allocation(gpu_sidecar, cuda_double, era,
                                                                                   api, async_load):
    layers = 4
    e = FakeEngine(gpu_sidecar.socket_path, EngineOptions(api=api, era=era, num_layers=layers, kv_memory=cuda_double,
                                                          extra_config={"async_load": async_load}))
    try:
        s, caps = read_stats(gpu_sidecar.socket_path)
        assert "cuda-ipc" in caps
        allocations = 1 if era == "shared_views" else layers
        assert s["gpu_handle_opens"] == allocations and s["gpu_mappings"] == allocations
        p1 = prompt(300, 1)
        run_requests(e, [("cold", p1)])
        assert e.scheduler.external_tokens == 0
        run_requests(e, [("warm", p1)])
        assert e.scheduler.external_tokens == 256
        w = e.worker_stats()[0]
        assert w["loaded_chunks"] == 4 and w["load_errors"] == 0 and w["store_errors"] == 0
        s, _ = read_stats(gpu_sidecar.socket_path)
        assert s["gpu_handle_opens"] == allocations, "an IPC handle was opened on the hot path"
        assert s["pinned_bytes"] > 0 and s["copy_errors"] == 0
    finally:
        pids = [proc.pid for proc, _ in e.workers]
        e.close()
        fake_api.activate(None)
        remove_device_memory(pids)
    # The engine is gone: its mappings are closed (an open mapping would pin its GPU memory).
    deadline = time.monotonic() + 10
    while read_stats(gpu_sidecar.socket_path)[0]["gpu_mappings"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_stats(gpu_sidecar.socket_path)[0]["gpu_mappings"] == 0


def test_vmm_kv_cache_is_refused_naming_the_option_and_the_engine_runs_uncached(monkeypatch):
    from csharp_kv import memory

    class FakeDriver:
        """cuPointerGetAttribute says "not legacy-IPC capable", as for cuMemCreate memory."""

        def cuMemGetAddressRange_v2(self, base, size, ptr):
            return 0

        def cuPointerGetAttribute(self, out, attr, ptr):
            out._obj.value = 0
            return 0

    monkeypatch.setattr(memory, "cuda_driver", lambda: FakeDriver())
    with pytest.raises(memory.UnsupportedLayout) as ex:
        memory.export_cuda_pointer(0x7F0000000000, 1 << 20, "GPU-facecda0-0000-0000-0000-000000000000")
    assert "--enable-sleep-mode" in str(ex.value) and "expandable_segments" in str(ex.value)


def test_sidecar_without_a_driver_serves_host_memory_only():
    if sidecar_bin() is None:
        pytest.skip(NOT_BUILT)
    s = SidecarProcess(extra_args=["--Sidecar:CudaDriverLibrary=/nonexistent/libcuda.so.1"])
    try:
        _, caps = read_stats(s.socket_path)
        assert caps == ("host-memory",)
        assert "host memory only" in s.log()
    finally:
        s.stop()


@pytest.mark.parametrize("library,env,expected", [
    ("/nonexistent/libcuda.so.1", {}, "cannot be loaded"),
    (None, {"FAKECUDA_NO_DEVICE": "1"}, "CUDA_ERROR_NO_DEVICE"),
])
def test_gpu_required_without_a_usable_driver_refuses_to_start(cuda_double, monkeypatch, library, env, expected):
    if sidecar_bin() is None:
        pytest.skip(NOT_BUILT)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SidecarStartError) as ex:
        SidecarProcess(extra_args=["--Sidecar:Gpu=required", f"--Sidecar:CudaDriverLibrary={library or cuda_double}"])
    assert ex.value.returncode == 1
    assert expected in ex.value.log
