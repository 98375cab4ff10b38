"""The hostile tests' raw protocol client: request frames and headers written by hand, replies matched by
request id, a deadline on every read, and the outcomes (:class:`Reply`) of a request that got no answer.

Imports only the standard library, msgpack and ``csharp_kv.protocol``: ``agent.py`` runs it from a
world-readable copy under another uid (see :func:`agents.agent_dir`)."""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    from csharp_kv import protocol as p
except ImportError:  # run from the repository without the integration conftest
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "python_shim"))
    from csharp_kv import protocol as p

Op = p.Opcode
E = p.ErrorCode

NO_REPLY = -1   # Reply.code: nothing came back before the deadline
CLOSED = -2     # Reply.code: the sidecar closed the connection (or it broke) before the reply

MiB = 1 << 20


def code_name(code: int) -> str:
    if code == 0:
        return "OK"
    if code == NO_REPLY:
        return "NO_REPLY"
    if code == CLOSED:
        return "CLOSED"
    try:
        return E(code).name
    except ValueError:
        return f"code {code}"


@dataclass
class Reply:
    """``code`` 0: ``fields`` is the reply; > 0: an ErrorCode; NO_REPLY / CLOSED: nothing came back."""

    code: int
    fields: list = field(default_factory=list)
    message: str = ""
    request_id: int = 0

    @property
    def ok(self) -> bool:
        return self.code == 0

    def get(self, index: int, default: Any = None) -> Any:
        return p.field(self.fields, index, default) if self.ok else default

    def describe(self) -> str:
        if self.ok:
            return repr(self.fields)[:200]
        return f"({self.message[:200]})" if self.message else ""


@dataclass
class Frame:
    version: int
    opcode: int
    flags: int
    request_id: int
    body: bytes

    def reply(self) -> Reply:
        fields = p.decode_body(self.body)
        if self.flags & p.FLAG_ERROR:
            return Reply(int(p.field(fields, 0, E.INTERNAL)), fields, str(p.field(fields, 1, "")), self.request_id)
        return Reply(0, fields, "", self.request_id)


class ProtocolViolation(Exception):
    """The sidecar sent bytes that are not a well-formed reply frame."""


class NoFrame(Exception):
    """No complete frame before the deadline."""


class PeerClosed(Exception):
    """The sidecar closed the connection."""


def header(opcode: int, request_id: int, body_length: int, version: int = p.VERSION, flags: int = 0,
           reserved: int = 0, magic: int = p.MAGIC) -> bytes:
    return p.HEADER.pack(magic, version, opcode, flags, reserved, request_id, body_length)


class RawConn:
    """A blocking protocol connection with a deadline on every read: requests may be pipelined, replies are
    matched by request id (others are kept for later), and nothing ever waits without a timeout."""

    _ids = 0

    def __init__(self, socket_path: str, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path)
        self.buf = bytearray()
        self.stash: Dict[int, Reply] = {}
        self.next_id = 1
        self.closed = False

    # -- sending
    def send_raw(self, data: bytes, timeout: float = 5.0) -> bool:
        """False when the sidecar closed the connection or did not take the bytes within ``timeout``."""
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
            return True
        except (OSError, socket.timeout):
            return False

    def send(self, opcode: int, fields: Optional[Sequence] = None, request_id: Optional[int] = None) -> int:
        rid = self._rid(request_id)
        self.send_raw(p.encode_frame(opcode, rid, fields))
        return rid

    def _rid(self, request_id: Optional[int]) -> int:
        if request_id is None:
            request_id = self.next_id
            self.next_id += 1
        return request_id

    # -- receiving
    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoFrame()
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise NoFrame() from None
            except OSError as e:
                self.closed = True
                raise PeerClosed(str(e)) from None
            if not chunk:
                self.closed = True
                raise PeerClosed("closed by the sidecar")
            self.buf += chunk

    def _parse(self) -> Optional[Frame]:
        """The first complete frame in the buffer, or None; ProtocolViolation for bytes that are no reply."""
        if len(self.buf) < p.HEADER_SIZE:
            return None
        magic, version, opcode, flags, reserved, rid, length = p.HEADER.unpack_from(self.buf)
        if magic != p.MAGIC or reserved != 0 or flags & ~(p.FLAG_REPLY | p.FLAG_ERROR) or not flags & p.FLAG_REPLY:
            raise ProtocolViolation(f"bad reply header {bytes(self.buf[:p.HEADER_SIZE]).hex()}")
        if length > 64 * MiB:
            raise ProtocolViolation(f"reply body of {length} bytes")
        if len(self.buf) < p.HEADER_SIZE + length:
            return None
        body = bytes(self.buf[p.HEADER_SIZE:p.HEADER_SIZE + length])
        del self.buf[:p.HEADER_SIZE + length]
        return Frame(version, opcode, flags, rid, body)

    def recv_frame(self, timeout: float) -> Frame:
        """The next frame; NoFrame at the deadline, PeerClosed at EOF, ProtocolViolation for bad bytes."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            self._fill(len(self.buf) + 1, deadline)

    def drain(self) -> List[Frame]:
        """Every complete frame that has arrived, without waiting (sets ``closed`` at EOF)."""
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    self.closed = True
                    break
                self.buf += chunk
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.closed = True
        frames = []
        while True:
            frame = self._parse()
            if frame is None:
                return frames
            frames.append(frame)

    def recv_reply(self, request_id: int, timeout: float = 5.0) -> Reply:
        if request_id in self.stash:
            return self.stash.pop(request_id)
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.recv_frame(max(0.0, deadline - time.monotonic()))
            except NoFrame:
                return Reply(NO_REPLY, message=f"no reply within {timeout:.1f} s")
            except PeerClosed as e:
                return Reply(CLOSED, message=str(e))
            try:
                reply = frame.reply()
            except (p.ProtocolError, ValueError, msgpack.ExtraData) as e:
                raise ProtocolViolation(f"undecodable reply body: {e}") from None
            if frame.request_id == request_id:
                return reply
            self.stash[frame.request_id] = reply

    def call(self, opcode: int, fields: Optional[Sequence] = None, timeout: float = 5.0,
             request_id: Optional[int] = None) -> Reply:
        rid = self._rid(request_id)
        if not self.send_raw(p.encode_frame(opcode, rid, fields), timeout):
            return Reply(CLOSED, message="send failed: the sidecar closed the connection or stopped reading")
        return self.recv_reply(rid, timeout)

    def call_many(self, requests: Iterable[Tuple[int, Optional[Sequence]]], window: int = 64,
                  timeout: float = 10.0) -> List[Reply]:
        """Pipelines requests ``window`` at a time (so neither side's socket buffer fills) and returns the replies in order."""
        out: List[Reply] = []
        batch: List[int] = []
        data = bytearray()

        def flush() -> None:
            if not batch:
                return
            sent = self.send_raw(bytes(data), timeout)
            for rid in batch:
                out.append(self.recv_reply(rid, timeout) if sent else Reply(CLOSED, message="send failed"))
            batch.clear()
            data.clear()

        for opcode, fields in requests:
            rid = self._rid(None)
            batch.append(rid)
            data += p.encode_frame(opcode, rid, fields)
            if len(batch) >= window:
                flush()
        flush()
        return out

    def wait_closed(self, timeout: float) -> bool:
        """Reads (and discards) until the sidecar closes the connection; False if it is still open at the deadline."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                return False
            except OSError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
        return True

    def hello(self, instance_id: str, role: str = "worker", rank: int = 0, pid: Optional[int] = None,
              timeout: float = 5.0) -> Reply:
        return self.call(Op.HELLO, p.hello(instance_id, role, rank, os.getpid() if pid is None else pid,
                                           engine_kind="test"), timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    def __enter__(self) -> "RawConn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
