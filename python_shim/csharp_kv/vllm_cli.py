"""``csharp-kv-vllm``: vLLM's own CLI with ``--kv-connector csharp-sidecar`` understood.

vLLM has no ``--kv-connector`` flag and plugins cannot add one (engines.md 2.3), so this wrapper
translates ``--kv-connector``, ``--kv-role`` and ``--kv-sidecar-*`` into ``--kv-transfer-config`` (merging
with one given as JSON or dotted keys, failing loudly on conflicts) and then runs ``vllm``."""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional

CONNECTOR_CLASS = "CSharpSidecarConnector"
CONNECTOR_MODULE = "csharp_kv.vllm.connector"
ALIASES = {"csharp-sidecar", CONNECTOR_CLASS}

# --kv-sidecar-<name> -> kv_connector_extra_config key
SIDECAR_OPTIONS = {
    "socket": "socket_path",
    "socket-path": "socket_path",
    "chunk-tokens": "chunk_tokens",
    "timeout-ms": "transfer_timeout_ms",
    "transfer-timeout-ms": "transfer_timeout_ms",
    "lookup-wait-ms": "lookup_wait_ms",
    "lookup-timeout-ms": "lookup_timeout_ms",
    "connect-timeout-ms": "connect_timeout_ms",
    "retry-interval-ms": "retry_interval_ms",
    "send-timeout-ms": "send_timeout_ms",
    "async-load": "async_load",
    "model-id": "model_id",
    "kv-dtype": "kv_dtype",
    "store-output": "store_output",
}
INT_KEYS = {"chunk_tokens"}
FLOAT_KEYS = {"transfer_timeout_ms", "lookup_wait_ms", "lookup_timeout_ms", "connect_timeout_ms", "retry_interval_ms",
              "send_timeout_ms"}


class TranslationError(ValueError):
    """Conflicting or malformed connector options."""


def _take_value(argv: List[str], i: int, flag: str) -> tuple:
    arg = argv[i]
    if "=" in arg:
        return arg.split("=", 1)[1], i + 1
    if i + 1 >= len(argv):
        raise TranslationError(f"{flag} needs a value")
    return argv[i + 1], i + 2


def _convert(key: str, value: str) -> Any:
    try:
        if key in INT_KEYS:
            return int(value)
        if key in FLOAT_KEYS:
            return float(value)
    except ValueError:
        raise TranslationError(f"--kv-sidecar option for {key} needs a number, got {value!r}") from None
    if key in ("async_load", "store_output"):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise TranslationError(f"--kv-sidecar option for {key} needs true or false, got {value!r}")
    return value


def _set(config: Dict[str, Any], key: str, value: Any, source: str) -> None:
    if key in config and config[key] != value:
        raise TranslationError(f"{source} sets {key}={value!r} but --kv-transfer-config already has {key}={config[key]!r}")
    config[key] = value


def translate_argv(argv: List[str]) -> List[str]:
    """Returns vLLM arguments with the connector options folded into one ``--kv-transfer-config``.
    Pure: no I/O, no vLLM import. Raises :class:`TranslationError` on conflicts."""
    out: List[str] = []
    base: Optional[Dict[str, Any]] = None
    dotted: Dict[str, Any] = {}
    connector = role = None
    sidecar: Dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name == "--kv-connector":
            connector, i = _take_value(argv, i, name)
        elif name == "--kv-role":
            role, i = _take_value(argv, i, name)
        elif name.startswith("--kv-sidecar-"):
            option = name[len("--kv-sidecar-"):]
            if option not in SIDECAR_OPTIONS:
                raise TranslationError(f"unknown option {name}; known: " + ", ".join("--kv-sidecar-" + k for k in SIDECAR_OPTIONS))
            key = SIDECAR_OPTIONS[option]
            value, i = _take_value(argv, i, name)
            _set(sidecar, key, _convert(key, value), name)
        elif name == "--kv-transfer-config":
            value, i = _take_value(argv, i, name)
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as e:
                raise TranslationError(f"--kv-transfer-config is not valid JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise TranslationError("--kv-transfer-config must be a JSON object")
            base = parsed
        elif name.startswith("--kv-transfer-config."):
            value, i = _take_value(argv, i, name)
            path = name[len("--kv-transfer-config."):].split(".")
            node = dotted
            for part in path[:-1]:
                node = node.setdefault(part, {})
            try:
                node[path[-1]] = json.loads(value)
            except json.JSONDecodeError:
                node[path[-1]] = value
        else:
            out.append(arg)
            i += 1
    if connector is None and role is None and not sidecar:
        return list(argv)  # nothing of ours: vLLM parses its own flags as given
    config: Dict[str, Any] = dict(base or {})
    for key, value in dotted.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            merged = dict(config[key])
            for k, v in value.items():
                _set(merged, k, v, f"--kv-transfer-config.{key}.{k}")
            config[key] = merged
        else:
            _set(config, key, value, f"--kv-transfer-config.{key}")
    if connector is not None:
        existing = config.get("kv_connector")
        same = existing in ALIASES and connector in ALIASES
        if existing is not None and existing != connector and not same:
            raise TranslationError(f"--kv-connector {connector} conflicts with kv_connector={existing!r} in --kv-transfer-config")
        config["kv_connector"] = connector
    if config.get("kv_connector") in ALIASES:
        config["kv_connector"] = CONNECTOR_CLASS
        _set(config, "kv_connector_module_path", CONNECTOR_MODULE, "--kv-connector")
    elif sidecar:
        raise TranslationError("--kv-sidecar-* options need --kv-connector csharp-sidecar")
    if role is not None:
        _set(config, "kv_role", role, "--kv-role")
    config.setdefault("kv_role", "kv_both")
    # A cache must never fail a request: recompute on load errors unless the user chose otherwise.
    config.setdefault("kv_load_failure_policy", "recompute")
    extra = dict(config.get("kv_connector_extra_config") or {})
    for key, value in sidecar.items():
        _set(extra, key, value, "--kv-sidecar-" + key.replace("_", "-"))
    if extra:
        config["kv_connector_extra_config"] = extra
    return out + ["--kv-transfer-config", json.dumps(config, sort_keys=True)]


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        translated = translate_argv(args)
    except TranslationError as e:
        print(f"csharp-kv-vllm: {e}", file=sys.stderr)
        return 2
    from vllm.entrypoints.cli.main import main as vllm_main  # noqa: PLC0415

    sys.argv = ["vllm"] + translated
    result = vllm_main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
