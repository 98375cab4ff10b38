"""Against a real local vLLM (runs only where vLLM is importable and a small model is available):
`vllm serve` with our connector, the same prompt twice; the second prefill is served by the sidecar and
the generated text equals a run without the connector.

Environment: KVSIDECAR_VLLM_MODEL (a local model path or a name already in the HF cache, default
facebook/opt-125m) and KVSIDECAR_BIN (the published sidecar)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _real_vllm_available() -> bool:
    from fake_engine.engine import real_vllm_installed  # noqa: PLC0415

    return real_vllm_installed() and shutil.which("vllm") is not None


pytestmark = pytest.mark.skipif(not _real_vllm_available(),
                                reason="a real vLLM is not installed here (no `vllm` module/CLI); this test runs "
                                       "on machines with vLLM and a small model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: str, extra_args: list, env: dict):
    port = _free_port()
    proc = subprocess.Popen(["vllm", "serve", model, "--port", str(port), "--max-model-len", "2048",
                             "--gpu-memory-utilization", "0.3", "--no-enable-prefix-caching", *extra_args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("vllm serve exited:\n" + proc.stdout.read())
            time.sleep(2)
    proc.kill()
    raise TimeoutError("vllm serve did not become healthy")


def _complete(port: int, model: str, prompt: str) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["text"]


def test_second_prefill_comes_from_sidecar_and_text_is_identical(tmp_path):
    from fake_engine.engine import SidecarProcess  # noqa: PLC0415

    model = os.environ.get("KVSIDECAR_VLLM_MODEL", "facebook/opt-125m")
    prompt = "The history of the Unix operating system begins " * 60
    env = dict(os.environ)
    baseline_proc, port = _serve(model, [], env)
    try:
        expected = _complete(port, model, prompt)
    finally:
        baseline_proc.terminate()
        baseline_proc.wait(60)

    sidecar = SidecarProcess(capacity_bytes=2 << 30)
    cfg = {"kv_connector": "CSharpSidecarConnector", "kv_connector_module_path": "csharp_kv.vllm.connector",
           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
           "kv_connector_extra_config": {"socket_path": sidecar.socket_path}}
    from csharp_kv import protocol as p  # noqa: PLC0415
    from csharp_kv.client import SidecarClient  # noqa: PLC0415

    proc, port = _serve(model, ["--kv-transfer-config", json.dumps(cfg)], env)
    try:
        first = _complete(port, model, prompt)
        client = SidecarClient(sidecar.socket_path, "test", "client")
        before = dict(zip(p.STATS_FIELDS, client.call(p.Opcode.STATS).fields))
        second = _complete(port, model, prompt)
        after = dict(zip(p.STATS_FIELDS, client.call(p.Opcode.STATS).fields))
        client.close()
    finally:
        proc.terminate()
        proc.wait(60)
        sidecar.stop()
    assert before["stored_chunks"] > 0, "the first request's prompt was not stored"
    assert after["loaded_chunks"] > before["loaded_chunks"], "the second prefill did not load from the sidecar"
    assert first == expected
    assert second == expected
