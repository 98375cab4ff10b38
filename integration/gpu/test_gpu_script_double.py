"""The GPU machine's script (integration/gpu/run_gpu_checks.py) end to end on the CUDA driver double, so that every
line of it has run before a lent GPU is spent on it: the real sidecar (framework-dependent, $KVSIDECAR_BIN), engine
processes driving the real shim's WorkerSide over double device memory, stores and loads with every byte compared,
the VMM refusal, two engines sharing a chunk, and an engine SIGKILLed while registered."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fake_engine.sidecar import NOT_BUILT, sidecar_bin

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(HERE, "run_gpu_checks.py")


@pytest.fixture(scope="module")
def double_lib(cuda_double):
    return cuda_double


@pytest.fixture(scope="module")
def sidecar():
    path = sidecar_bin()
    if path is None:
        pytest.skip(NOT_BUILT)
    return path


def test_gpu_script_on_the_driver_double(double_lib, sidecar, tmp_path):
    report = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVSIDECAR_FAKE", "FAKECUDA_"))}
    proc = subprocess.run([sys.executable, SCRIPT, "--sidecar", sidecar, "--backend", "double", "--quick",
                           "--double-lib", double_lib, "--json", str(report)],
                          capture_output=True, text=True, timeout=150, env=env, cwd=REPO)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    result = json.loads(report.read_text())
    checks = result["checks"]

    # Stores, loads into other blocks, every byte compared: 3 rounds x 2 loads x 4 chunks, and one chunk more.
    assert checks["bytes_verified"]["ok"], output
    assert checks["bytes_verified"]["bytes"] == (3 * 2 * 4 + 1) * result["chunk_bytes"]
    assert result["register"]["registered"]
    assert len(result["latency_samples"]) == 20

    # (a) the shim refuses VMM memory with the message naming the option; the engine runs on, uncached.
    vmm = checks["vmm_refusal"]
    assert vmm["ok"], output
    assert "expandable_segments:True" in vmm["disabled_reason"] and "expandable_segments" in vmm["warning"]
    assert vmm["load"]["failed_blocks"] == 16 and vmm["store"]["stored_chunks"] == 0

    # (b) a chunk stored by one engine process, loaded by another (both ways), bytes compared.
    two = checks["two_engines"]
    assert two["ok"], output
    assert two["a_to_b"] == {"stored": 2, "loaded": 2, "bytes_ok": True}
    assert two["b_to_a"] == {"stored": 1, "loaded": 1, "bytes_ok": True}

    # (c) an engine SIGKILLed while registered (loads in flight): the sidecar serves on.
    killed = checks["killed_engine"]
    assert killed["ok"], output
    assert killed["k"]["exit"] == -9 and killed["sidecar_alive"]
    assert killed["b_round_trip"]["bytes_ok"] and killed["b_loads_k"]["bytes_ok"] and killed["a_round_trip"]["bytes_ok"]
    assert checks["sidecar_alive_at_end"]["ok"]

    # The table: every figure present; no IPC open on the hot path where STATS counts them.
    names = [f["figure"] for f in result["figures"]]
    for name in ("registration (32 layers)", "store bandwidth", "load bandwidth", "one-chunk load p50",
                 "one-chunk load p99", "IPC opens in hot loop"):
        assert name in names, names
        assert name in proc.stdout
    ipc = next(f for f in result["figures"] if f["figure"] == "IPC opens in hot loop")
    if ipc["value"] is not None:
        assert ipc["value"] == 0 and ipc["met"], ipc
    assert result["machine"]["device_uuid"] == "GPU-facecda0-0000-0000-0000-000000000000"
    assert "RESULT: PASS" in proc.stdout
    # No shm object of an engine is left behind, the SIGKILLed one's included.
    pids = set(result["engine_pids"].values())
    assert len(pids) == 4
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("fakecuda") and any(f"-{pid}-" in p for pid in pids)]


def test_gpu_script_names_a_missing_module():
    """The GPU machine may lack msgpack: the script stops before starting anything and says what to do."""
    code = ("import runpy, sys; sys.modules['msgpack'] = None; "
            f"sys.argv = [{SCRIPT!r}, '--sidecar', '/nonexistent', '--backend', 'double']; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "missing Python module(s): msgpack" in proc.stderr
    assert "integration/gpu/README.md" in proc.stderr
