"""The kvsidecar wire protocol (docs/protocol.md): a 24-byte little-endian header, then a MessagePack
array body. Token ids travel as bin (u32le), block ids as bin (i32le), keys as bin (32 bytes each)."""

from __future__ import annotations

import enum
import struct
from array import array
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import msgpack

MAGIC = 0x4353564B  # b"KVSC" read as u32le
VERSION = 1
HEADER = struct.Struct("<IHHHHQI")
HEADER_SIZE = HEADER.size  # 24

FLAG_REPLY = 1
FLAG_ERROR = 2


class Opcode(enum.IntEnum):
    HELLO = 1
    PING = 2
    REGISTER = 3
    LOOKUP = 4
    STORE = 5
    LOAD = 6
    RELEASE = 7
    CLEAR = 8
    STATS = 9


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_OPCODE = 3
    BAD_REQUEST = 4
    FRAME_TOO_LARGE = 5
    NOT_READY = 6
    OUT_OF_RANGE = 7
    BAD_LAYOUT = 8
    MEMORY_ACCESS_DENIED = 9
    MEMORY_FAULT = 10
    NO_SPACE = 11
    UNKNOWN_LEASE = 12
    SHUTTING_DOWN = 13
    INTERNAL = 14
    UNSUPPORTED = 15
    PERMISSION_DENIED = 16
    LIMIT_EXCEEDED = 17


class LookupState(enum.IntEnum):
    READY = 0
    PENDING = 1
    NOT_REGISTERED = 2


class ProtocolError(Exception):
    """The byte stream from the sidecar cannot be parsed."""


@dataclass(frozen=True)
class Header:
    version: int
    opcode: int
    flags: int
    request_id: int
    body_length: int


def encode_frame(opcode: int, request_id: int, fields: Optional[Sequence[Any]], flags: int = 0) -> bytes:
    """One frame: header plus the msgpack array of ``fields`` (None: an empty body)."""
    body = b"" if fields is None else msgpack.packb(list(fields), use_bin_type=True)
    return HEADER.pack(MAGIC, VERSION, int(opcode), flags, 0, request_id, len(body)) + body


def decode_header(data: bytes) -> Header:
    magic, version, opcode, flags, reserved, request_id, length = HEADER.unpack_from(data)
    if magic != MAGIC or reserved != 0 or flags & ~(FLAG_REPLY | FLAG_ERROR):
        raise ProtocolError("malformed frame header from the sidecar")
    return Header(version, opcode, flags, request_id, length)


def decode_body(body: bytes) -> list:
    if not body:
        return []
    value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    if not isinstance(value, list):
        raise ProtocolError("a body that is not an array")
    return value


def tokens_to_bytes(tokens: Sequence[int]) -> bytes:
    """u32le token ids."""
    if isinstance(tokens, (bytes, bytearray)):
        return bytes(tokens)
    a = array("I", tokens)
    if a.itemsize != 4:  # pragma: no cover - every Linux target has a 4-byte unsigned int
        a = array("L", tokens)
    return a.tobytes()


def block_ids_to_bytes(block_ids: Sequence[int]) -> bytes:
    """i32le block ids (-1: skip the block in a LOAD)."""
    return array("i", block_ids).tobytes()


# Message builders: positions follow docs/protocol.md section 3 exactly.

def hello(instance_id: str, role: str, rank: int, pid: int, engine_kind: str = "vllm",
          engine_version: str = "", capabilities: Sequence[str] = ("host-memory",)) -> list:
    return [VERSION, engine_kind, engine_version, instance_id, role, rank, list(capabilities), pid]


def namespace(model_id: str, kv_dtype: str, block_tokens: int, chunk_tokens: int, tp_size: int,
              tp_rank: int, kv_group: int = 0, format_version: int = 1) -> list:
    return [model_id, kv_dtype, block_tokens, chunk_tokens, tp_size, tp_rank, kv_group, format_version]


def memory_ref_host(pid: int, address: int, length: int) -> list:
    return [1, pid, address, length, None, None, 0]


def memory_ref_cuda(ipc_handle: bytes, device_uuid: str, offset: int, length: int, pid: int) -> list:
    return [2, pid, 0, length, ipc_handle, device_uuid, offset]


def layout(element_size: int, num_blocks: int, block_tokens: int, num_heads: int, row_bytes: int,
           stride_block: int, stride_token: int, stride_head: int, k_offset: int, v_offset: int) -> list:
    return [element_size, num_blocks, block_tokens, num_heads, row_bytes, stride_block, stride_token,
            stride_head, k_offset, v_offset]


def register(ns: list, layers: Sequence[list], store_event: Optional[bytes] = None) -> list:
    """``store_event``: CUDA engines' 64-byte IPC event handle, recorded after each forward pass (docs/protocol.md)."""
    return [ns, list(layers), store_event]


def lookup(request_id: str, cache_salt: Optional[str], tokens: bytes, lease: bool) -> list:
    return [request_id, cache_salt, tokens, lease]


def store(request_id: str, cache_salt: Optional[str], tokens: bytes, first_chunk: int, num_chunks: int,
          block_ids: bytes, deadline_ms: int = 0, deadline_ns: int = 0, chain: Optional[bytes] = None) -> list:
    """``deadline_ns``: the absolute ``time.monotonic_ns()`` at which the engine stops waiting (0: none).
    ``chain``: the opaque chain state of an earlier STORE reply of the request; ``tokens`` then start at the chunk
    after the one it names (``chain_chunk(chain) + 1``) instead of at the request's first token."""
    return [request_id, cache_salt, tokens, None, first_chunk, num_chunks, block_ids, deadline_ms, deadline_ns, chain]


def chain_chunk(chain: bytes) -> int:
    """The chunk index a chain state names (its first four bytes, u32le)."""
    return struct.unpack_from("<I", chain, 0)[0]


def load(request_id: str, cache_salt: Optional[str], tokens: bytes, first_chunk: int, num_chunks: int,
         block_ids: bytes, lease_id: int = 0, deadline_ns: int = 0) -> list:
    """``deadline_ns``: the absolute ``time.monotonic_ns()`` after which no byte may be written (0: none)."""
    return [request_id, cache_salt, tokens, None, first_chunk, num_chunks, block_ids, lease_id, deadline_ns]


def release(lease_id: int, request_id: Optional[str]) -> list:
    return [lease_id, request_id]


STATS_FIELDS = ("capacity_bytes", "used_bytes", "chunks", "hits", "misses", "evictions", "stored_chunks",
                "loaded_chunks", "stored_bytes", "loaded_bytes", "active_leases", "protocol_errors",
                "copy_errors", "connections", "registrations", "late_stores", "late_loads", "permission_denied",
                "limits_exceeded", "dropped_connections", "gpu_handle_opens", "gpu_mappings", "pinned_bytes",
                "pin_failures", "tiers")
TIER_STATS_FIELDS = ("name", "policy", "capacity_bytes", "used_bytes", "chunks", "hits", "misses", "bytes_read",
                     "bytes_written", "writes", "drops", "not_admitted", "evictions", "corrupt", "errors", "queue_depth",
                     "write_through_offers", "demotions", "promotions", "promotion_failures")


def field(fields: list, index: int, default: Any = None) -> Any:
    """A reply field by position; missing trailing fields read as their default (forward compatible)."""
    return fields[index] if index < len(fields) else default
