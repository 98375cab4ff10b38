#!/usr/bin/env python3
"""Writes frames.json: one frame of every message, built from docs/protocol.md alone.

The 24-byte header is packed with ``struct`` and the body with the ``msgpack`` package (its default,
smallest encodings; ``use_bin_type=True`` so bytes are ``bin`` and text is ``str``). Nothing here comes
from the C# encoder or from the shim's ``csharp_kv.protocol``: both are checked against this file
(tests/Connector.Protocol.Tests/GoldenFrameTests.cs and python_shim/tests/test_protocol.py), so it must
not be regenerated from either of them.

Every frame holds the complete field list of the current protocol (fields added since are encoded with
their values or defaults), which is what both encoders write; missing trailing fields on input are
covered by the unit tests of each side.

Run: /usr/bin/python3 tests/golden/make_frames.py            (rewrites frames.json)
     /usr/bin/python3 tests/golden/make_frames.py --check    (exit 1 if frames.json is not what this writes)
"""
import json
import os
import struct
import sys

import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "frames.json")

# Section 1: magic "KVSC", u16 version, u16 opcode, u16 flags, u16 reserved (0), u64 request_id, u32 body_length.
HEADER = struct.Struct("<4sHHHHQI")
assert HEADER.size == 24
MAGIC = b"KVSC"
VERSION = 1
REPLY = 1
ERROR = 2

# Section 3, opcodes.
HELLO, PING, REGISTER, LOOKUP, STORE, LOAD, RELEASE, CLEAR, STATS = range(1, 10)

# Section 2, error codes (16 and 17 were added after the document's last revision).
OUT_OF_RANGE = 7
PERMISSION_DENIED = 16
LIMIT_EXCEEDED = 17

# Field positions of every message, in the order section 3 lists them.
FIELDS = {
    "Hello": ("protocol_version", "engine_kind", "engine_version", "instance_id", "role", "rank", "capabilities", "pid"),
    "HelloReply": ("protocol_version", "server_version", "capabilities", "max_frame_bytes", "session_id", "server_pid"),
    "Ping": ("nonce",),
    "Register": ("namespace", "layers", "store_event"),
    "Namespace": ("model_id", "kv_dtype", "block_tokens", "chunk_tokens", "tp_size", "tp_rank", "kv_group", "format_version"),
    "Layer": ("name", "memory", "layout"),
    "MemoryRef": ("kind", "pid", "address", "length", "ipc_handle", "device_uuid", "offset"),
    "Layout": ("element_size", "num_blocks", "block_tokens", "num_heads", "row_bytes", "stride_block", "stride_token",
               "stride_head", "k_offset", "v_offset"),
    "RegisterReply": ("registration_id", "layout_fingerprint", "chunk_bytes", "blocks_per_chunk"),
    "Lookup": ("request_id", "cache_salt", "tokens", "lease"),
    "LookupReply": ("hit_tokens", "hit_chunks", "lease_id", "state"),
    "Store": ("request_id", "cache_salt", "tokens", "keys", "first_chunk", "num_chunks", "block_ids", "deadline_ms",
              "deadline_ns", "chain"),
    "StoreReply": ("stored", "already_present", "failed", "chain"),
    "Load": ("request_id", "cache_salt", "tokens", "keys", "first_chunk", "num_chunks", "block_ids", "lease_id",
             "deadline_ns"),
    "LoadReply": ("loaded_chunks",),
    "Release": ("lease_id", "request_id"),
    "ReleaseReply": ("released_chunks",),
    "ClearReply": ("removed_chunks",),
    "StatsReply": ("capacity_bytes", "used_bytes", "chunks", "hits", "misses", "evictions", "stored_chunks",
                   "loaded_chunks", "stored_bytes", "loaded_bytes", "active_leases", "protocol_errors", "copy_errors",
                   "connections", "registrations", "late_stores", "late_loads", "permission_denied", "limits_exceeded",
                   "dropped_connections", "gpu_handle_opens", "gpu_mappings", "pinned_bytes", "pin_failures", "tiers"),
    "TierStats": ("name", "policy", "capacity_bytes", "used_bytes", "chunks", "hits", "misses", "bytes_read",
                  "bytes_written", "writes", "drops", "not_admitted", "evictions", "corrupt", "errors", "queue_depth",
                  "write_through_offers", "demotions", "promotions", "promotion_failures"),
    "Error": ("code", "message"),
}

# Inclusive bounds of the integer fields (everything not listed is an int that fits i32).
U32 = (0, 2**32 - 1)
U64 = (0, 2**64 - 1)
I64 = (-2**63, 2**63 - 1)
BOUNDS = {
    ("HelloReply", "session_id"): U64,
    ("MemoryRef", "address"): U64, ("MemoryRef", "length"): U64, ("MemoryRef", "offset"): U64,
    **{("Layout", f): I64 for f in ("stride_block", "stride_token", "stride_head", "k_offset", "v_offset")},
    ("RegisterReply", "registration_id"): U64, ("RegisterReply", "chunk_bytes"): U64,
    ("LookupReply", "lease_id"): U64,
    ("Store", "deadline_ms"): U32, ("Store", "deadline_ns"): U64,
    ("Load", "lease_id"): U64, ("Load", "deadline_ns"): U64,
    ("Release", "lease_id"): U64,
    ("Ping", "nonce"): U64,
    **{("StatsReply", f): U64 for f in FIELDS["StatsReply"]},
    **{("TierStats", f): U64 for f in FIELDS["TierStats"]},
}
I32 = (-2**31, 2**31 - 1)


def msg(type_name, /, **values):
    """The field list of one message of type ``type_name``: every field by name, placed at its position."""
    names = FIELDS[type_name]
    if set(values) != set(names):
        raise ValueError(f"{type_name}: expected fields {names}, got {sorted(values)}")
    for name, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool):
            lo, hi = BOUNDS.get((type_name, name), I32)
            if not lo <= value <= hi:
                raise ValueError(f"{type_name}.{name} = {value} is outside [{lo}, {hi}]")
    return [values[n] for n in names]


def u32le(values):
    """Token ids: bin of u32le."""
    return struct.pack("<%dI" % len(values), *values)


def i32le(values):
    """Block ids: bin of i32le."""
    return struct.pack("<%di" % len(values), *values)


def frame(name, opcode, flags, request_id, fields):
    """One golden entry; ``fields`` None is an empty body."""
    body = b"" if fields is None else msgpack.packb(fields, use_bin_type=True)
    header = HEADER.pack(MAGIC, VERSION, opcode, flags, 0, request_id, len(body))
    return {
        "name": name,
        "opcode": opcode,
        "flags": flags,
        "request_id": request_id,
        "fields": None if fields is None else to_json(fields),
        "frame_hex": (header + body).hex(),
    }


def to_json(value):
    """Fields as JSON: bin as {"hex": ...} so it cannot be mistaken for a str."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def stats(**values):
    return msg("StatsReply", **values)


def frames():
    register_layer = msg(
        "Layer",
        name="model.layers.0.self_attn.attn",
        memory=msg("MemoryRef", kind=1, pid=4242, address=0x7F0000001000, length=1 << 30, ipc_handle=None,
                   device_uuid=None, offset=0),
        layout=msg("Layout", element_size=2, num_blocks=2048, block_tokens=16, num_heads=8, row_bytes=256,
                   stride_block=65536, stride_token=2048, stride_head=256, k_offset=0, v_offset=32768))
    quiet_stats = dict(capacity_bytes=1 << 32, used_bytes=1 << 25, chunks=1, hits=2, misses=3, evictions=4,
                       stored_chunks=5, loaded_chunks=6, stored_bytes=7, loaded_bytes=8, active_leases=9,
                       protocol_errors=10, copy_errors=11, connections=12, registrations=13, late_stores=14,
                       late_loads=0, permission_denied=0, limits_exceeded=0, dropped_connections=0,
                       gpu_handle_opens=0, gpu_mappings=0, pinned_bytes=0, pin_failures=0, tiers=None)
    return [
        frame("hello", HELLO, 0, 1, msg(
            "Hello", protocol_version=1, engine_kind="vllm", engine_version="0.29.0", instance_id="engine-7f3a",
            role="worker", rank=1, capabilities=["host-memory"], pid=4242)),
        frame("hello_reply", HELLO, REPLY, 1, msg(
            "HelloReply", protocol_version=1, server_version="1.0.0", capabilities=["host-memory"],
            max_frame_bytes=64 << 20, session_id=9, server_pid=77)),
        frame("ping", PING, 0, 2, msg("Ping", nonce=0xDEADBEEF)),
        frame("ping_empty", PING, 0, 3, None),
        frame("register", REGISTER, 0, 4, msg(
            "Register",
            namespace=msg("Namespace", model_id="meta-llama/Meta-Llama-3-8B", kv_dtype="bfloat16", block_tokens=16,
                          chunk_tokens=256, tp_size=2, tp_rank=1, kv_group=0, format_version=1),
            layers=[register_layer], store_event=None)),
        frame("register_cuda", REGISTER, 0, 15, msg(
            "Register",
            namespace=msg("Namespace", model_id="m", kv_dtype="bfloat16", block_tokens=16, chunk_tokens=256, tp_size=1,
                          tp_rank=0, kv_group=0, format_version=1),
            layers=[msg("Layer", name="l0",
                        memory=msg("MemoryRef", kind=2, pid=0, address=0, length=1 << 33, ipc_handle=bytes(range(64)),
                                   device_uuid="GPU-facecda0-0000-0000-0000-000000000000", offset=1 << 21),
                        layout=msg("Layout", element_size=2, num_blocks=4096, block_tokens=16, num_heads=8,
                                   row_bytes=256, stride_block=65536, stride_token=2048, stride_head=256, k_offset=0,
                                   v_offset=1 << 32))],
            store_event=bytes(range(64, 128)))),
        frame("register_reply", REGISTER, REPLY, 4, msg(
            "RegisterReply", registration_id=3, layout_fingerprint="0123456789abcdef0123456789abcdef",
            chunk_bytes=33554432, blocks_per_chunk=16)),
        frame("lookup", LOOKUP, 0, 5, msg(
            "Lookup", request_id="cmpl-1", cache_salt="tenant-a", tokens=u32le([1, 2, 3, 128000, 0xFFFFFFFF]),
            lease=True)),
        frame("lookup_reply", LOOKUP, REPLY, 5, msg("LookupReply", hit_tokens=512, hit_chunks=2, lease_id=17, state=0)),
        frame("store", STORE, 0, 6, msg(
            "Store", request_id="cmpl-1", cache_salt=None, tokens=u32le([5, 6, 7, 8]), keys=None, first_chunk=1,
            num_chunks=1, block_ids=i32le([10, 11, 12, 13]), deadline_ms=10000, deadline_ns=0, chain=None)),
        # An absolute CLOCK_MONOTONIC deadline (about 11 days of uptime: a u64 beyond 32 bits) next to a
        # deadline_ms, a non-ASCII salt.
        frame("store_deadline_ns", STORE, 0, 12, msg(
            "Store", request_id="cmpl-2", cache_salt="t\u00e9nant-\u4e2d", tokens=u32le(range(100, 112)), keys=None,
            first_chunk=1, num_chunks=2, block_ids=i32le([20, 21, 22, 23, 24, 25, 26, 27]), deadline_ms=250,
            deadline_ns=987_654_321_012_345, chain=None)),
        # A resumed store: an opaque 68-byte chain state from an earlier reply; tokens start after its chunk.
        frame("store_chain", STORE, 0, 14, msg(
            "Store", request_id="cmpl-3", cache_salt=None, tokens=u32le(range(200, 204)), keys=None, first_chunk=3,
            num_chunks=1, block_ids=i32le([30, 31, 32, 33]), deadline_ms=0, deadline_ns=5_000_000_000,
            chain=bytes(range(68)))),
        frame("store_reply", STORE, REPLY, 6, msg("StoreReply", stored=1, already_present=0, failed=0, chain=None)),
        frame("store_reply_chain", STORE, REPLY, 14, msg("StoreReply", stored=1, already_present=0, failed=0,
                                                         chain=bytes(range(68, 136)))),
        frame("load", LOAD, 0, 7, msg(
            "Load", request_id="cmpl-1", cache_salt="tenant-a", tokens=None, keys=bytes(32), first_chunk=0,
            num_chunks=1, block_ids=i32le([-1, -1, 4, 5]), lease_id=17, deadline_ns=0)),
        # 2**32 is the smallest deadline that needs a 64-bit integer; block ids at the i32 extremes.
        frame("load_deadline_ns", LOAD, 0, 13, msg(
            "Load", request_id="cmpl-2", cache_salt=None, tokens=u32le([7, 0, 65535, 65536, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 42]),
            keys=None, first_chunk=0, num_chunks=2, block_ids=i32le([-1, 3, -2**31, 2**31 - 1]), lease_id=0,
            deadline_ns=1 << 32)),
        frame("load_reply", LOAD, REPLY, 7, msg("LoadReply", loaded_chunks=1)),
        frame("release", RELEASE, 0, 8, msg("Release", lease_id=0, request_id="cmpl-1")),
        frame("release_reply", RELEASE, REPLY, 8, msg("ReleaseReply", released_chunks=2)),
        frame("clear", CLEAR, 0, 9, None),
        frame("clear_reply", CLEAR, REPLY, 9, msg("ClearReply", removed_chunks=3)),
        frame("stats", STATS, 0, 10, None),
        frame("stats_reply", STATS, REPLY, 10, stats(**quiet_stats)),
        # Every counter non-zero, at the edges of MessagePack's integer encodings (fixint, uint8, uint16,
        # uint32, uint64), up to the largest u64.
        frame("stats_reply_all_fields", STATS, REPLY, 14, stats(
            capacity_bytes=1 << 40, used_bytes=2**32 - 1, chunks=1 << 16, hits=2**16 - 1, misses=256, evictions=255,
            stored_chunks=128, loaded_chunks=127, stored_bytes=1 << 32, loaded_bytes=2**64 - 1, active_leases=10,
            protocol_errors=11, copy_errors=12, connections=13, registrations=14, late_stores=15, late_loads=16,
            permission_denied=17, limits_exceeded=18, dropped_connections=19, gpu_handle_opens=20, gpu_mappings=21,
            pinned_bytes=1 << 33, pin_failures=23, tiers=[msg(
                "TierStats", name="disk", policy="write-back", capacity_bytes=1 << 40, used_bytes=1 << 33, chunks=300,
                hits=1, misses=2, bytes_read=3, bytes_written=4, writes=5, drops=6, not_admitted=7, evictions=8,
                corrupt=9, errors=10, queue_depth=11, write_through_offers=12, demotions=13, promotions=14,
                promotion_failures=2**64 - 1)])),
        frame("error", LOAD, REPLY | ERROR, 11, msg("Error", code=OUT_OF_RANGE, message="block id 4096 is outside [0, 2048)")),
        # Request id 0 is a valid id; a message short enough for a fixstr.
        frame("error_permission_denied", REGISTER, REPLY | ERROR, 0, msg(
            "Error", code=PERMISSION_DENIED, message="pid 4243 is not the caller")),
        # A request id above 2**63 (the header's u64 is unsigned).
        frame("error_limit_exceeded", LOOKUP, REPLY | ERROR, 0xFEDCBA9876543210, msg(
            "Error", code=LIMIT_EXCEEDED, message="200000 tokens is above Limits:MaxTokens (131072)")),
    ]


def render():
    return json.dumps(frames(), indent=2) + "\n"


def main(argv):
    text = render()
    if argv[1:] == ["--check"]:
        with open(PATH) as f:
            if f.read() != text:
                print(f"{PATH} is not what {os.path.basename(__file__)} writes; run it without --check", file=sys.stderr)
                return 1
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    with open(PATH, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
