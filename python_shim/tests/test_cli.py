import json

import pytest

from csharp_kv.vllm_cli import TranslationError, main, translate_argv


def _config(argv):
    i = argv.index("--kv-transfer-config")
    return argv[:i] + argv[i + 2:], json.loads(argv[i + 1])


def test_kv_connector_flag_becomes_transfer_config():
    rest, cfg = _config(translate_argv(["serve", "m", "--kv-connector", "csharp-sidecar", "--kv-sidecar-socket",
                                        "/run/x.sock", "--kv-sidecar-chunk-tokens=512", "--port", "8000"]))
    assert rest == ["serve", "m", "--port", "8000"]
    assert cfg["kv_connector"] == "CSharpSidecarConnector"
    assert cfg["kv_connector_module_path"] == "csharp_kv.vllm.connector"
    assert cfg["kv_role"] == "kv_both"
    assert cfg["kv_load_failure_policy"] == "recompute"
    assert cfg["kv_connector_extra_config"] == {"socket_path": "/run/x.sock", "chunk_tokens": 512}


def test_merges_with_existing_json_and_dotted_keys():
    argv = ["serve", "m", "--kv-transfer-config", '{"kv_role": "kv_consumer", "kv_connector_extra_config": {"lookup_wait_ms": 2}}',
            "--kv-transfer-config.engine_id", "e1", "--kv-connector", "csharp-sidecar", "--kv-sidecar-async-load", "true"]
    _, cfg = _config(translate_argv(argv))
    assert cfg["kv_role"] == "kv_consumer"
    assert cfg["engine_id"] == "e1"
    assert cfg["kv_connector_extra_config"] == {"lookup_wait_ms": 2, "async_load": True}


def test_user_failure_policy_is_kept():
    _, cfg = _config(translate_argv(["--kv-connector", "csharp-sidecar", "--kv-transfer-config.kv_load_failure_policy", "fail"]))
    assert cfg["kv_load_failure_policy"] == "fail"


@pytest.mark.parametrize("argv,message", [
    (["--kv-connector", "csharp-sidecar", "--kv-transfer-config", '{"kv_connector": "NixlConnector"}'], "conflicts"),
    (["--kv-connector", "csharp-sidecar", "--kv-role", "kv_producer", "--kv-transfer-config", '{"kv_role": "kv_consumer"}'], "kv_role"),
    (["--kv-sidecar-socket", "/x"], "need --kv-connector"),
    (["--kv-connector", "csharp-sidecar", "--kv-sidecar-bogus", "1"], "unknown option"),
    (["--kv-connector", "csharp-sidecar", "--kv-sidecar-chunk-tokens", "lots"], "number"),
    (["--kv-connector"], "needs a value"),
    (["--kv-transfer-config", "{not json", "--kv-connector", "csharp-sidecar"], "JSON"),
])
def test_conflicts_and_bad_values_fail_loudly(argv, message):
    with pytest.raises(TranslationError, match=message):
        translate_argv(argv)


def test_nothing_to_translate_leaves_argv_alone():
    argv = ["serve", "m", "--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}']
    assert translate_argv(argv) == argv


def test_main_runs_vllm_cli_with_translated_argv():
    from vllm.entrypoints.cli import main as vllm_main

    vllm_main.calls.clear()
    assert main(["serve", "m", "--kv-connector", "csharp-sidecar"]) == 0
    argv = vllm_main.calls[-1]
    assert argv[:3] == ["vllm", "serve", "m"]
    assert json.loads(argv[-1])["kv_connector"] == "CSharpSidecarConnector"


def test_main_reports_conflicts_with_exit_code_2(capsys):
    assert main(["--kv-sidecar-socket", "/x"]) == 2
    assert "need --kv-connector" in capsys.readouterr().err
