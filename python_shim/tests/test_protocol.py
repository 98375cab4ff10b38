import json
import os

import msgpack
import pytest

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


@pytest.mark.parametrize("frame", _frames(), ids=lambda f: f["name"])
def test_encode_matches_golden_frame_from_csharp(frame):
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
    hello = p.hello("engine-7f3a", "worker", 1, 4242, engine_kind="vllm", engine_version="0.29.0")
    assert p.encode_frame(p.Opcode.HELLO, 1, hello).hex() == frames["hello"]["frame_hex"]


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
