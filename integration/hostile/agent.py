"""An engine-like process for the hostile tests (a victim worker, or an attacker under another uid): it owns
KV memory (a ctypes buffer), holds named sidecar connections, and obeys commands from the test process.

Transport: stdin/stdout, each message a u32le length and a MessagePack array. The first message out is
``{"pid", "uid", "gid"}``; then every command ``[name, args...]`` is answered ``["ok", value]`` or
``["error", text]``. Run by :class:`agents.Agent`, never by hand."""

from __future__ import annotations

import os
import socket
import struct
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import msgpack  # noqa: E402

from pool import HostBuffer, grant_ptrace  # noqa: E402
from wire import CLOSED, ProtocolViolation, RawConn, p  # noqa: E402


class AgentState:
    def __init__(self) -> None:
        self.memory: HostBuffer | None = None
        self.conns: dict = {}

    # -- memory
    def alloc(self, nbytes: int, seed: str) -> int:
        self.memory = HostBuffer(nbytes, seed)
        return self.memory.address

    def read(self, offset: int, length: int) -> bytes:
        return self.memory.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.memory.write(offset, data)

    def digest(self) -> str:
        return self.memory.digest()

    def grant_ptrace(self, sidecar_pid: int) -> bool:
        return grant_ptrace(sidecar_pid)

    # -- connections
    def connect(self, name: str, path: str) -> None:
        self.close(name)
        self.conns[name] = RawConn(path)

    def call(self, name: str, opcode: int, fields, timeout: float) -> list:
        conn = self.conns[name]
        try:
            r = conn.call(opcode, fields, timeout)
        except ProtocolViolation as e:
            return [CLOSED, f"protocol violation: {e}", []]
        return [r.code, r.message, r.fields]

    def send_frames(self, name: str, frames: list, timeout: float) -> int:
        conn = self.conns[name]
        sent = 0
        for opcode, fields in frames:
            if not conn.send_raw(p.encode_frame(opcode, conn._rid(None), fields), timeout):
                break
            sent += 1
        return sent

    def close(self, name: str) -> None:
        conn = self.conns.pop(name, None)
        if conn is not None:
            conn.close()


def read_message(stream):
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack("<I", head)
    return msgpack.unpackb(stream.read(n), raw=False, strict_map_key=False)


def write_message(stream, value) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    stream.write(struct.pack("<I", len(data)) + data)
    stream.flush()


def main() -> int:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    state = AgentState()
    write_message(out, {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()})
    while True:
        message = read_message(inp)
        if message is None or message[0] == "exit":
            if message is not None:
                write_message(out, ["ok", None])
            return 0
        name, args = message[0], message[1:]
        try:
            write_message(out, ["ok", getattr(state, name)(*args)])
        except (Exception, socket.timeout):  # noqa: BLE001 - reported to the test, which decides
            write_message(out, ["error", traceback.format_exc(limit=3)])


if __name__ == "__main__":
    sys.exit(main())
