import json
import os
import subprocess
import sys

import msgpack
import pytest

# frames.json is written by tests/golden/make_frames.py from docs/protocol.md alone (struct and msgpack,
# no code of the shim or of the C# side); the shim's protocol module is checked against it both ways.
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests", "golden")
from csharp_kv import protocol as p


def _from_json(value):
    if isinstance(value, dict) and set(value) == {"hex"}:
        return bytes.fromhex(value["hex"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _frames():
    with open(os.path.join(GOLDEN, "frames.json")) as f:
        return json.load(f)


def test_golden_file_is_what_make_frames_writes_without_the_shim():
    script = os.path.join(GOLDEN, "make_frames.py")
    code = ("import runpy, sys\n"
            "g = runpy.run_path(sys.argv[1])\n"
            "shim = sorted(m for m in sys.modules if m.split('.')[0] == 'csharp_kv')\n"
            "assert not shim, 'make_frames.py imported the shim: %s' % shim\n"
            "sys.stdout.write(g['render']())\n")
    out = subprocess.run([sys.executable, "-c", code, script], capture_output=True, text=True, cwd=GOLDEN)
    assert out.returncode == 0, out.stderr
    with open(os.path.join(GOLDEN, "frames.json")) as f:
        assert out.stdout == f.read(), "frames.json is stale: run /usr/bin/python3 tests/golden/make_frames.py"


@pytest.mark.parametrize("frame", _frames(), ids=lambda f: f["name"])
def test_encode_matches_golden_frame(frame):
    fields = None if frame["fields"] is None else _from_json(frame["fields"])
    encoded = p.encode_frame(frame["opcode"], frame["request_id"], fields, flags=frame["flags"])
    assert encoded.hex() == frame["frame_hex"]


@pytest.mark.parametrize("frame", _frames(), ids=lambda f: f["name"])
def test_decode_golden_frame(frame):
    data = bytes.fromhex(frame["frame_hex"])
    header = p.decode_header(data)
    assert (header.opcode, header.flags, header.request_id) == (frame["opcode"], frame["flags"], frame["request_id"])
    assert header.body_length == len(data) - p.HEADER_SIZE
    body = p.decode_body(data[p.HEADER_SIZE:])
    assert body == ([] if frame["fields"] is None else _from_json(frame["fields"]))


def test_builders_match_the_golden_request_shapes():
    frames = {f["name"]: f for f in _frames()}
    lookup = p.lookup("cmpl-1", "tenant-a", p.tokens_to_bytes([1, 2, 3, 128000, 0xFFFFFFFF]), True)
    assert p.encode_frame(p.Opcode.LOOKUP, 5, lookup).hex() == frames["lookup"]["frame_hex"]
    store = p.store("cmpl-1", None, p.tokens_to_bytes([5, 6, 7, 8]), 1, 1, p.block_ids_to_bytes([10, 11, 12, 13]), 10000)
    assert p.encode_frame(p.Opcode.STORE, 6, store).hex() == frames["store"]["frame_hex"]
    store = p.store("cmpl-2", "t\u00e9nant-\u4e2d", p.tokens_to_bytes(range(100, 112)), 1, 2,
                    p.block_ids_to_bytes(range(20, 28)), deadline_ms=250, deadline_ns=987_654_321_012_345)
    assert p.encode_frame(p.Opcode.STORE, 12, store).hex() == frames["store_deadline_ns"]["frame_hex"]
    load = p.load("cmpl-2", None, p.tokens_to_bytes([7, 0, 65535, 65536, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 42]), 0, 2,
                  p.block_ids_to_bytes([-1, 3, -2**31, 2**31 - 1]), lease_id=0, deadline_ns=1 << 32)
    assert p.encode_frame(p.Opcode.LOAD, 13, load).hex() == frames["load_deadline_ns"]["frame_hex"]
    release = p.release(0, "cmpl-1")
    assert p.encode_frame(p.Opcode.RELEASE, 8, release).hex() == frames["release"]["frame_hex"]
    hello = p.hello("engine-7f3a", "worker", 1, 4242, engine_kind="vllm", engine_version="0.29.0")
    assert p.encode_frame(p.Opcode.HELLO, 1, hello).hex() == frames["hello"]["frame_hex"]


def test_golden_replies_read_with_the_shims_names():
    frames = {f["name"]: f for f in _frames()}

    def body(name):
        return p.decode_body(bytes.fromhex(frames[name]["frame_hex"])[p.HEADER_SIZE:])

    stats = body("stats_reply_all_fields")
    assert len(stats) == len(p.STATS_FIELDS) == 25
    named = dict(zip(p.STATS_FIELDS, stats))
    assert (named["late_stores"], named["late_loads"], named["permission_denied"], named["limits_exceeded"],
            named["dropped_connections"]) == (15, 16, 17, 18, 19)
    assert (named["gpu_handle_opens"], named["gpu_mappings"], named["pinned_bytes"], named["pin_failures"]) == (
        20, 21, 1 << 33, 23)
    disk = dict(zip(p.TIER_STATS_FIELDS, named["tiers"][0]))
    assert (disk["name"], disk["policy"], disk["demotions"], disk["promotion_failures"]) == ("disk", "write-back", 13,
                                                                                            2**64 - 1)
    assert named["loaded_bytes"] == 2**64 - 1
    assert p.field(body("stats_reply"), p.STATS_FIELDS.index("dropped_connections"), None) == 0
    for name, code in [("error", p.ErrorCode.OUT_OF_RANGE), ("error_permission_denied", p.ErrorCode.PERMISSION_DENIED),
                       ("error_limit_exceeded", p.ErrorCode.LIMIT_EXCEEDED)]:
        header = p.decode_header(bytes.fromhex(frames[name]["frame_hex"]))
        assert header.flags == p.FLAG_REPLY | p.FLAG_ERROR
        assert p.ErrorCode(body(name)[0]) is code


@pytest.mark.parametrize("offset,value", [(0, 0x58), (10, 1), (8, 4)])
def test_decode_header_rejects_corruption(offset, value):
    data = bytearray(p.encode_frame(p.Opcode.PING, 1, [1]))
    data[offset] = value
    with pytest.raises(p.ProtocolError):
        p.decode_header(bytes(data))


def test_decode_body_rejects_non_array():
    with pytest.raises(p.ProtocolError):
        p.decode_body(msgpack.packb({"a": 1}))


def test_field_reads_missing_trailing_fields_as_default():
    assert p.field([1, 2], 5, "d") == "d"
    assert p.field([1, 2], 1) == 2
