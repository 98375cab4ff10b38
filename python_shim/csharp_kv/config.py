"""Connector settings from ``kv_transfer_config.kv_connector_extra_config``, validated at start-up with
messages that say what to change."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and the fix."""


def default_socket_path() -> str:
    runtime = os.environ.get("KVSIDECAR_SOCKET")
    if runtime:
        return runtime
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "kvsidecar", "sidecar.sock") if xdg else "/run/kvsidecar/sidecar.sock"


@dataclass(frozen=True)
class ShimConfig:
    """Keys of ``kv_connector_extra_config`` (all optional):

    - ``socket_path``: the sidecar's socket (default $KVSIDECAR_SOCKET, $XDG_RUNTIME_DIR/kvsidecar/sidecar.sock,
      or /run/kvsidecar/sidecar.sock).
    - ``chunk_tokens``: tokens per cached chunk, a multiple of the block size (default 256).
    - ``lookup_wait_ms``: the most the scheduler waits for lookup answers in one step, all requests together;
      a lookup not answered by then is "not yet" and asked again next step (default 0.5).
    - ``lookup_timeout_ms``: after this a lookup counts as a miss (default 1000).
    - ``transfer_timeout_ms``: the most a load or store may take before it counts as failed (default 10000).
    - ``connect_timeout_ms``, ``retry_interval_ms``: connection set-up (in the background) and the least time
      between two connection attempts (500, 100).
    - ``send_timeout_ms``: the most one request may wait to be written to the socket; a sidecar that stops
      reading is disconnected instead (default 20).
    - ``async_load``: load in the background while the request waits (WAITING_FOR_REMOTE_KVS) (default false).
    - ``model_id``, ``kv_dtype``: namespace overrides (default: the model name and the KV cache dtype).
    - ``store_output``: also cache chunks of generated tokens (default true).
    """

    socket_path: str
    chunk_tokens: int = 256
    lookup_wait_ms: float = 0.5
    lookup_timeout_ms: float = 1000.0
    transfer_timeout_ms: float = 10000.0
    connect_timeout_ms: float = 500.0
    retry_interval_ms: float = 100.0
    send_timeout_ms: float = 20.0
    async_load: bool = False
    model_id: Optional[str] = None
    kv_dtype: Optional[str] = None
    store_output: bool = True

    @staticmethod
    def from_extra_config(extra: Optional[Mapping[str, Any]], block_size: int) -> "ShimConfig":
        extra = dict(extra or {})
        known = set(ShimConfig.__dataclass_fields__)
        unknown = sorted(k for k in extra if k not in known and not k.startswith("_"))
        if unknown:
            raise ConfigError(f"kvsidecar: unknown kv_connector_extra_config keys {unknown}; known keys: {sorted(known)}")

        def number(key: str, default: float, minimum: float) -> float:
            value = extra.get(key, default)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"kvsidecar: {key}={value!r} is not a number") from None
            if value < minimum:
                raise ConfigError(f"kvsidecar: {key}={value} must be at least {minimum}")
            return value

        socket_path = str(extra.get("socket_path") or default_socket_path())
        if len(socket_path.encode()) > 107:
            raise ConfigError(f"kvsidecar: socket_path {socket_path!r} is longer than 107 bytes; use a shorter path")
        # A missing directory is not an error: systemd removes RuntimeDirectory while the sidecar is stopped, and
        # the engine then runs uncached and connects when the sidecar comes back.
        chunk = extra.get("chunk_tokens", 256)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
            raise ConfigError(f"kvsidecar: chunk_tokens={chunk!r} must be a positive integer")
        if block_size <= 0 or chunk % block_size != 0:
            raise ConfigError(f"kvsidecar: chunk_tokens={chunk} is not a multiple of the block size {block_size}; "
                              f"set chunk_tokens to a multiple of {block_size} (e.g. {max(1, 256 // block_size) * block_size})")

        def flag(key: str, default: bool) -> bool:
            value = extra.get(key, default)
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
            if isinstance(value, bool):
                return value
            raise ConfigError(f"kvsidecar: {key}={value!r} must be true or false")

        return ShimConfig(
            socket_path=socket_path,
            chunk_tokens=chunk,
            lookup_wait_ms=number("lookup_wait_ms", 0.5, 0.0),
            lookup_timeout_ms=number("lookup_timeout_ms", 1000.0, 1.0),
            transfer_timeout_ms=number("transfer_timeout_ms", 10000.0, 1.0),
            connect_timeout_ms=number("connect_timeout_ms", 500.0, 1.0),
            retry_interval_ms=number("retry_interval_ms", 100.0, 1.0),
            send_timeout_ms=number("send_timeout_ms", 20.0, 1.0),
            async_load=flag("async_load", False),
            model_id=extra.get("model_id"),
            kv_dtype=extra.get("kv_dtype"),
            store_output=flag("store_output", True),
        )
