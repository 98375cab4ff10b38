"""A seeded protocol fuzzer (no external fuzzing package): valid frames of every opcode, then mutated -
MessagePack fields replaced by wrong types, nil, huge and negative integers; fields dropped or added;
bodies that are no array; bit flips in header and body; truncated and extended bodies; lying length
fields; random opcodes, versions, flags and reserved bits.

It runs in a child process of the test (:func:`child_main`) with KV memory of its own: a REGISTER names only
that memory (its own pid or 0, an address and length inside its buffer), so a sidecar that writes where a
fuzzed layout tells it can only hurt the fuzz client, which the test then sees die. Byte-level mutations are
never applied to REGISTER frames, and a byte-mutated frame never reads as a REGISTER, so no mutation can name
another process's memory.

Oracles in the child, after every batch: every byte the sidecar sent parses as a reply frame with a
MessagePack array body (an error body being [known code, str]); every connection whose byte stream is
still in step answers a trailing PING or is closed by the sidecar within a bound (no hang). The test
process adds its own: the sidecar is alive and a well-behaved client is served."""

from __future__ import annotations

import os
import random
import sys
import time
import traceback
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import msgpack

from pool import Geometry, HostBuffer, bb, tb, tokens_for
from wire import CLOSED, NO_REPLY, E, Frame, Op, ProtocolViolation, RawConn, Reply, code_name, header, p, unique

FUZZ_GEOMETRY = Geometry(num_layers=2, num_blocks=16, block_tokens=16, chunk_tokens=32, num_heads=2, row_bytes=64,
                           model_id="fuzz/model")
CONNECTIONS = 4
PING_BASE = 0xF0F0_0000_0000
REPLY_TIMEOUT = 3.0
MAX_FRAME_BYTES = 64 << 20

U64 = (1 << 64) - 1
HOSTILE_INTS = [0, 1, -1, 2, 255, 256, 65535, 65536, (1 << 31) - 1, 1 << 31, -(1 << 31), (1 << 32) - 1, 1 << 32,
                (1 << 53) + 1, (1 << 63) - 1, -(1 << 63), 1 << 63, U64]


def hostile_value(rng: random.Random, register: bool = False) -> Any:
    """A value of the wrong type or an extreme one. Inside a REGISTER no array of integers is produced (it
    could read as a MemoryRef naming some other process)."""
    choices = [
        lambda: None, lambda: rng.choice(HOSTILE_INTS), lambda: rng.uniform(-1e300, 1e300), lambda: float("nan"),
        lambda: True, lambda: "", lambda: "x" * rng.choice([1, 255, 256, 257, 4096]), lambda: "\u0000\ud7ff\u00e9",
        lambda: b"", lambda: bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 3, 31, 33, 4095]))),
        lambda: [], lambda: [[]], lambda: {}, lambda: {"k": 1}, lambda: {1: [None]},
        lambda: nested(rng.randint(2, 60)), lambda: [None] * rng.choice([1, 100, 10000]),
    ]
    if not register:
        choices += [lambda: [rng.choice(HOSTILE_INTS) for _ in range(rng.randint(1, 12))],
                    lambda: list(range(rng.choice([100, 50000])))]
    return rng.choice(choices)()


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


class FrameMaker:
    """Valid request bodies for one connection's state, and their mutations."""

    def __init__(self, rng: random.Random, memory: HostBuffer, seed: int):
        self.rng = rng
        self.memory = memory
        self.pid = os.getpid()
        self.g = FUZZ_GEOMETRY
        self.token_pool = tokens_for(f"fuzz-{seed}", 8 * self.g.chunk_tokens)
        self.request_ids = ["r0", "r1", "", "r" * 300, "é" * 130]
        self.salts = [None, "", "a", "fuzz", "é" * 128, "s" * 300]

    # -- valid bodies
    def valid(self, opcode: int) -> Optional[list]:
        r, g = self.rng, self.g
        if opcode == Op.HELLO:
            return p.hello(r.choice(["fz-a", "fz-b", unique("fz")]), r.choice(["scheduler", "worker", "client", "?"]),
                           r.randint(-1, 8), r.choice([self.pid, self.pid, 0]), engine_kind="fuzz")
        if opcode == Op.PING:
            return None if r.random() < 0.3 else [r.getrandbits(64)]
        if opcode == Op.REGISTER:
            return g.register_fields(r.choice([self.pid, self.pid, 0]), self.memory.address)
        if opcode == Op.LOOKUP:
            return p.lookup(r.choice(self.request_ids), r.choice(self.salts), self.tokens(), r.random() < 0.5)
        if opcode in (Op.STORE, Op.LOAD):
            first, num = r.randint(0, 2), r.randint(0, 3)
            blocks = [r.randrange(g.num_blocks) for _ in range(num * g.blocks_per_chunk)]
            tokens = tb(self.token_pool[:(first + num + r.randint(0, 2)) * g.chunk_tokens])
            deadline = r.choice([0, 0, 1, time.monotonic_ns() - 10**9, time.monotonic_ns() + 10**10, (1 << 63) - 1])
            if opcode == Op.STORE:
                return p.store(r.choice(self.request_ids), r.choice(self.salts), tokens, first, num, bb(blocks),
                               deadline_ms=r.choice([0, 0, 1, 100000]), deadline_ns=deadline)
            blocks = [b if r.random() < 0.8 else -1 for b in blocks]
            return p.load(r.choice(self.request_ids), r.choice(self.salts), tokens, first, num, bb(blocks),
                          lease_id=r.choice([0, 1, r.getrandbits(64)]), deadline_ns=deadline)
        if opcode == Op.RELEASE:
            return p.release(r.choice([0, 1, 2, r.getrandbits(64)]), r.choice([None, "r0", "r1"]))
        return None  # CLEAR, STATS

    def tokens(self) -> bytes:
        n = self.rng.choice([0, 1, 31, 32, 64, 96, 128, 200, 256])
        return tb(self.token_pool[:n])

    # -- structured mutations (MessagePack level; safe for REGISTER)
    def mutate_fields(self, opcode: int, fields: Optional[list]) -> Any:
        r = self.rng
        kind = r.randrange(6)
        if fields is None or kind == 0:
            return r.choice([None, 0, -1, U64, "body", b"\x01", {}, {"a": [1]}, 1.5]) if r.random() < 0.5 else \
                hostile_value(r, register=opcode == Op.REGISTER)
        fields = list(fields)
        if opcode == Op.REGISTER:
            return self.mutate_register(fields)
        if kind == 1:
            return fields[:r.randrange(len(fields) + 1)]
        if kind == 2:
            return fields + [hostile_value(r) for _ in range(r.randint(1, 4))]
        if kind == 3 and opcode in (Op.LOOKUP, Op.STORE, Op.LOAD):
            return self.mutate_arrays(opcode, fields)
        for _ in range(r.randint(1, 3)):
            fields[r.randrange(len(fields))] = hostile_value(r)
        return fields

    def mutate_arrays(self, opcode: int, fields: list) -> list:
        """Token and block arrays of odd sizes and counts that do not match them."""
        r = self.rng
        tokens_at, blocks_at = (2, None) if opcode == Op.LOOKUP else (2, 6)
        fields[tokens_at] = r.choice([b"", b"\x01\x02\x03", bytes(4 * 1024 + 1), bytes(256 * 1024), None])
        if blocks_at is not None:
            fields[blocks_at] = r.choice([b"", b"\xff\xff\xff", bb([-2] * 4), bb([1 << 30] * 4), bytes(40000)])
            fields[4] = r.choice([fields[4], -1, (1 << 31) - 1, 4097, 1 << 20])
            fields[5] = r.choice([fields[5], -1, 0, 4097, (1 << 31) - 1])
        return fields

    def mutate_register(self, fields: list) -> list:
        """Namespace and layout fields go wild; a MemoryRef keeps this process (own pid or 0) and its own
        buffer (an address inside it, a length that does not pass its end)."""
        r = self.rng
        ns, layers = fields[0], [list(layer) for layer in fields[1]]
        choice = r.randrange(8)
        if choice == 7:  # nil (or a scalar) where a layer, its memory or its layout is expected
            target = r.randrange(3)
            value = r.choice([None, None, 0, "layer", b""])
            if target == 0:
                layers.insert(r.randrange(len(layers) + 1), value)
            else:
                r.choice(layers)[target] = value
        elif choice == 0:
            ns = list(ns)
            ns[r.randrange(len(ns))] = hostile_value(r, register=True) if r.random() < 0.4 else r.choice(HOSTILE_INTS)
        elif choice in (1, 2):
            layer = r.choice(layers)
            layout = list(layer[2])
            for _ in range(r.randint(1, 3)):
                layout[r.randrange(len(layout))] = r.choice(HOSTILE_INTS + [r.randint(-4096, 1 << 20)])
            layer[2] = layout
        elif choice == 3:
            layer = r.choice(layers)
            mem = list(layer[1])
            offset = r.randrange(0, self.memory.nbytes, 64)
            mem[0] = r.choice([1, 1, 0, 2, 3, -1])
            mem[1] = r.choice([self.pid, 0])
            mem[2] = self.memory.address + offset
            mem[3] = r.randint(0, self.memory.nbytes - offset)
            if mem[0] == 2:
                mem[4], mem[5] = bytes(r.getrandbits(8) for _ in range(64)), "GPU-fuzz"
            layer[1] = mem
        elif choice == 4:
            layers = r.choice([[], layers * r.randint(2, 100), layers[:1]])
        elif choice == 5:
            layer = r.choice(layers)
            layer[r.randrange(3)] = hostile_value(r, register=True)
        else:
            return [ns, hostile_value(r, register=True)] if r.random() < 0.5 else [hostile_value(r, register=True), layers]
        return [ns, layers]

    # -- byte-level mutations (never REGISTER)
    def mutate_bytes(self, frame: bytearray) -> Tuple[bytearray, bool]:
        """Returns the frame and whether the byte stream may have left step with the sidecar's parser."""
        r = self.rng
        body_len = len(frame) - p.HEADER_SIZE
        kind = r.randrange(9)
        in_step = True
        if kind == 0 and body_len:
            for _ in range(r.randint(1, 8)):
                i = p.HEADER_SIZE + r.randrange(body_len)
                frame[i] ^= 1 << r.randrange(8)
        elif kind == 1:
            for _ in range(r.randint(1, 3)):
                i = r.randrange(p.HEADER_SIZE)
                frame[i] ^= 1 << r.randrange(8)
            in_step = False
        elif kind == 2 and body_len:
            del frame[len(frame) - r.randint(1, body_len):]
            in_step = False
        elif kind == 3:
            junk = bytes(r.getrandbits(8) for _ in range(r.randint(1, 64)))
            frame += junk
            if r.random() < 0.5:
                frame[20:24] = (body_len + len(junk)).to_bytes(4, "little")  # trailing bytes after the MessagePack value
            else:
                in_step = False
        elif kind == 4:
            frame[20:24] = r.choice([0, 1, max(0, body_len - 1), body_len + 1, r.randrange(4096), r.randrange(1 << 20),
                                     MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1, 0x7FFFFFFF, 0xFFFFFFFF]).to_bytes(4, "little")
            in_step = frame[20:24] == body_len.to_bytes(4, "little")
        elif kind == 5:
            frame[6:8] = r.choice([0, 10, 11, 255, 0x7003, 0xFFFF, r.randrange(65536)]).to_bytes(2, "little")
        elif kind == 6:
            frame[4:6] = r.choice([0, 2, 0x100, 0xFFFF]).to_bytes(2, "little")
        elif kind == 7:
            if r.random() < 0.5:
                frame[8:10] = r.choice([1, 2, 3, 4, 0x8000, r.randrange(65536)]).to_bytes(2, "little")
            else:
                frame[10:12] = r.choice([1, 0x8000, 0xFFFF]).to_bytes(2, "little")
            in_step = False
        else:
            body = bytes(r.getrandbits(8) for _ in range(r.choice([1, 2, 7, 100, 1000])))
            frame = bytearray(frame[:p.HEADER_SIZE]) + body
            frame[20:24] = len(body).to_bytes(4, "little")
        if frame[6:8] == int(Op.REGISTER).to_bytes(2, "little"):
            frame[6:8] = (0x7003).to_bytes(2, "little")  # no byte-mutated frame may read as a REGISTER
        return frame, in_step


class Slot:
    def __init__(self, conn: RawConn):
        self.conn = conn
        self.in_step = True
        self.frames = 0
        self.recent: Dict[int, bytes] = {}  # request id -> the frame's first bytes, for failure messages

    def remember(self, frame: bytes) -> None:
        if len(self.recent) > 512:
            self.recent.clear()
        self.recent[int.from_bytes(frame[12:20], "little")] = frame[:400]


class FuzzClient:
    """Sends fuzzed frames over several connections and checks every reply it gets."""

    OPCODES = [Op.HELLO, Op.PING, Op.REGISTER, Op.LOOKUP, Op.STORE, Op.LOAD, Op.RELEASE, Op.CLEAR, Op.STATS]
    WEIGHTS = [6, 4, 10, 14, 16, 16, 5, 1, 3]

    def __init__(self, socket_path: str, seed: int):
        self.socket_path = socket_path
        self.seed = seed
        self.rng = random.Random(seed)
        self.memory = HostBuffer(FUZZ_GEOMETRY.total_bytes, f"fuzz-{seed}")
        self.maker = FrameMaker(self.rng, self.memory, seed)
        self.slots: List[Optional[Slot]] = [None] * CONNECTIONS
        self.sent = 0
        self.pings = 0
        self.totals: Counter = Counter()

    # -- connections
    def open_slot(self, i: int, violations: List[str]) -> Slot:
        slot = Slot(RawConn(self.socket_path, timeout=REPLY_TIMEOUT))
        if self.rng.random() < 0.85:
            hello = slot.conn.call(Op.HELLO, p.hello(self.rng.choice(["fz-a", "fz-b"]), "worker", 0, os.getpid(),
                                                     engine_kind="fuzz"), REPLY_TIMEOUT)
            self.check_reply(hello, violations, "HELLO of a fresh connection")
            if hello.ok and self.rng.random() < 0.75:
                reg = slot.conn.call(Op.REGISTER, FUZZ_GEOMETRY.register_fields(os.getpid(), self.memory.address),
                                     REPLY_TIMEOUT)
                self.check_reply(reg, violations, "REGISTER of a fresh connection")
        self.slots[i] = slot
        self.totals["connections"] += 1
        return slot

    def check_reply(self, reply: Reply, violations: List[str], what: str) -> None:
        if reply.code == NO_REPLY:
            violations.append(f"{what}: no reply within {REPLY_TIMEOUT} s")
        elif reply.code > 0 and reply.code not in set(E):
            violations.append(f"{what}: unknown error code {reply.code}")

    def check_frames(self, frames: List[Frame], violations: List[str], slot: Slot) -> None:
        for f in frames:
            try:
                reply = f.reply()
            except Exception as e:  # noqa: BLE001 - any decode failure is a violation
                violations.append(f"undecodable reply body for request {f.request_id}: {e!r} {f.body[:64].hex()}")
                continue
            self.totals["replies"] += 1
            if reply.code:
                self.totals[f"error {code_name(reply.code)}"] += 1
                if reply.code not in set(E) or not isinstance(p.field(reply.fields, 1), str):
                    violations.append(f"malformed error body {reply.fields!r:.200}")
                elif reply.code == E.INTERNAL:
                    request = slot.recent.get(f.request_id, b"").hex()
                    violations.append(f"INTERNAL error (a sidecar bug by docs/protocol.md) for opcode {f.opcode}: "
                                      f"{reply.message[:300]}; the request frame (hex): {request}")
            else:
                self.totals[f"ok {Op(f.opcode).name if f.opcode in set(Op) else f.opcode}"] += 1

    # -- a batch
    def run_batch(self, n: int) -> Dict[str, Any]:
        violations: List[str] = []
        t0 = time.monotonic()
        for _ in range(n):
            i = self.rng.randrange(CONNECTIONS)
            slot = self.slots[i]
            if slot is None or slot.conn.closed:
                if slot is not None:
                    slot.conn.close()
                    self.totals["closed by the sidecar"] += 1
                try:
                    slot = self.open_slot(i, violations)
                except (OSError, ProtocolViolation) as e:
                    violations.append(f"cannot open a connection: {e!r}")
                    continue
            frame, in_step = self.make_frame()
            if not slot.conn.send_raw(bytes(frame), timeout=REPLY_TIMEOUT):
                slot.conn.closed = True
            slot.remember(bytes(frame))
            slot.in_step &= in_step
            slot.frames += 1
            if not in_step and self.rng.random() < 0.7:
                slot.conn.closed = True  # most out-of-step streams end here; the others go on as garbage
            self.sent += 1
            try:
                self.check_frames(slot.conn.drain(), violations, slot)
            except ProtocolViolation as e:
                violations.append(f"bad bytes from the sidecar: {e}")
                slot.conn.closed = True
        self.finish_batch(violations)
        return {"frames": n, "seconds": round(time.monotonic() - t0, 2), "violations": violations}

    def make_frame(self) -> Tuple[bytearray, bool]:
        r, m = self.rng, self.maker
        opcode = r.choices(self.OPCODES, self.WEIGHTS)[0]
        fields = m.valid(opcode)
        roll = r.random()
        rid = r.choice([0, 1, r.getrandbits(64), r.getrandbits(16)])
        if roll < 0.25:
            self.totals["valid"] += 1
            return bytearray(p.encode_frame(opcode, rid, fields)), True
        if roll < 0.6 or opcode == Op.REGISTER:
            self.totals["field mutations"] += 1
            body = self.maker.mutate_fields(opcode, fields)
            data = msgpack.packb(body, use_bin_type=True)
            return bytearray(header(opcode, rid, len(data)) + data), True
        self.totals["byte mutations"] += 1
        return m.mutate_bytes(bytearray(p.encode_frame(opcode, rid, fields)))

    def finish_batch(self, violations: List[str]) -> None:
        """A connection still in step must answer a PING (or have been closed); others are closed by us."""
        for i, slot in enumerate(self.slots):
            if slot is None:
                continue
            if slot.conn.closed or not slot.in_step:
                slot.conn.close()
                self.slots[i] = None
                continue
            self.pings += 1
            rid = PING_BASE + self.pings
            try:
                reply = slot.conn.call(Op.PING, [rid], REPLY_TIMEOUT, request_id=rid)
            except ProtocolViolation as e:
                violations.append(f"bad bytes from the sidecar: {e}")
                reply = Reply(CLOSED)
            for stashed in slot.conn.stash.values():
                if stashed.code > 0 and stashed.code not in set(E):
                    violations.append(f"unknown error code {stashed.code}")
            slot.conn.stash.clear()
            if reply.code == NO_REPLY:
                violations.append(f"connection {i} hangs: no answer to a PING within {REPLY_TIMEOUT} s after "
                                  f"{slot.frames} frames, and not closed")
            elif reply.ok and reply.fields != [rid]:
                violations.append(f"PING {rid} answered with {reply.fields!r}")
            if not reply.ok:
                slot.conn.close()
                self.slots[i] = None

    def close(self) -> None:
        for slot in self.slots:
            if slot is not None:
                slot.conn.close()


def child_main(pipe, socket_path: str, seed: int) -> None:
    """The fuzz client's process: ("batch", n) runs n frames and answers ("ok", report); ("stop", None) ends."""
    client = None
    try:
        client = FuzzClient(socket_path, seed)
        while pipe.poll(300):
            command, arg = pipe.recv()
            if command == "stop":
                pipe.send(("ok", {"sent": client.sent, "totals": dict(client.totals)}))
                return
            pipe.send(("ok", client.run_batch(arg)))
    except Exception:  # noqa: BLE001 - reported to the test
        pipe.send(("error", traceback.format_exc()))
    finally:
        if client is not None:
            client.close()
        sys.stdout.flush()
