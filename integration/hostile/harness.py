"""Machinery of the hostile-client tests: a sidecar started with extra settings, a raw protocol client
whose every read has a deadline, engine memory owned by this or another process, a victim engine in a
process of its own, and soft checks that report every broken expectation of an attack at once.

This module imports only the standard library, msgpack and ``csharp_kv.protocol``: ``agent.py`` imports
it from a world-readable copy when it runs under another uid (see :func:`agent_dir`)."""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

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
FOREIGN_UID = 65534  # nobody


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


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Polls ``predicate`` until it returns something truthy or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- checks

class Checks:
    """Soft assertions: an attack test records every expectation (the refusal code, the victim's memory,
    the victim's lookups, the daemon's health, the counters) and :meth:`verify` fails with all that broke."""

    def __init__(self, context: str = ""):
        self.context = context
        self.failures: List[str] = []
        self.count = 0

    def check(self, condition: Any, message: str) -> bool:
        self.count += 1
        if not condition:
            self.failures.append(message)
        return bool(condition)

    def code(self, reply: "Reply", expected: int, what: str) -> bool:
        return self.check(reply.code == expected,
                          f"{what}: expected {code_name(expected)}, got {code_name(reply.code)} {reply.describe()}")

    def refused(self, reply: "Reply", what: str) -> bool:
        return self.check(not reply.ok, f"{what}: expected a refusal, got OK {reply.fields!r}")

    def verify(self) -> None:
        assert self.count > 0, "a test that checked nothing"
        if self.failures:
            head = f"{len(self.failures)} of {self.count} checks failed" + (f" ({self.context})" if self.context else "")
            raise AssertionError(head + ":\n  - " + "\n  - ".join(self.failures))


# ---------------------------------------------------------------------------------------------- frames

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


# ---------------------------------------------------------------------------------------------- memory

def pattern(seed: Any, nbytes: int) -> bytes:
    """Reproducible pseudo-random bytes: a victim's secret or an attacker's own KV."""
    return random.Random(f"pattern/{seed}").randbytes(nbytes)


def tokens_for(seed: Any, count: int) -> List[int]:
    rng = random.Random(f"tokens/{seed}")
    return [rng.randrange(1000, 150000) for _ in range(count)]


def tb(tokens: Sequence[int]) -> bytes:
    return p.tokens_to_bytes(tokens)


def bb(block_ids: Sequence[int]) -> bytes:
    return p.block_ids_to_bytes(block_ids)


class HostBuffer:
    """KV memory of this process: a ctypes array whose address the sidecar may be told about."""

    def __init__(self, nbytes: int, seed: Any = None):
        self.nbytes = nbytes
        self.buf = (ctypes.c_ubyte * nbytes)()
        self.address = ctypes.addressof(self.buf)
        if seed is not None:
            self.write(0, pattern(seed, nbytes))

    def read(self, offset: int = 0, length: Optional[int] = None) -> bytes:
        length = self.nbytes - offset if length is None else length
        if offset < 0 or offset + length > self.nbytes:
            raise ValueError("read outside the buffer")
        return ctypes.string_at(self.address + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.nbytes:
            raise ValueError("write outside the buffer")
        ctypes.memmove(self.address + offset, data, len(data))

    def digest(self) -> str:
        return hashlib.sha256(self.read()).hexdigest()


PR_SET_PTRACER = 0x59616D61


def grant_ptrace(sidecar_pid: int) -> bool:
    """prctl(PR_SET_PTRACER, sidecar_pid) as an engine does; False where the kernel has no Yama (nothing to grant)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(sidecar_pid), 0, 0, 0) == 0


@dataclass(frozen=True)
class Geometry:
    """A small blocks-first NHD KV cache: ``num_layers`` regions of ``num_blocks`` blocks, back to back."""

    num_layers: int = 2
    num_blocks: int = 16
    block_tokens: int = 16
    chunk_tokens: int = 32
    num_heads: int = 2
    row_bytes: int = 64
    element_size: int = 2
    model_id: str = "hostile/tiny-model"
    kv_dtype: str = "float16"
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one layer (K and V)."""
        return 2 * self.block_tokens * self.num_heads * self.row_bytes

    @property
    def layer_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_tokens

    @property
    def chunk_bytes(self) -> int:
        return self.num_layers * self.blocks_per_chunk * self.block_bytes

    def layout(self) -> list:
        n, h, r = self.block_tokens, self.num_heads, self.row_bytes
        return p.layout(self.element_size, self.num_blocks, n, h, r, 2 * n * h * r, h * r, r, 0, n * h * r)

    def namespace(self, model_id: Optional[str] = None) -> list:
        return p.namespace(self.model_id if model_id is None else model_id, self.kv_dtype, self.block_tokens,
                           self.chunk_tokens, self.tp_size, self.tp_rank)

    def register_fields(self, pid: int, address: int, layer_refs: Optional[Sequence[Tuple[int, int]]] = None,
                        model_id: Optional[str] = None) -> list:
        """REGISTER of ``pid``'s memory at ``address``; ``layer_refs`` overrides (pid, address) per layer."""
        layers = []
        for i in range(self.num_layers):
            lp, la = layer_refs[i] if layer_refs else (pid, address + i * self.layer_bytes)
            layers.append([f"model.layers.{i}.attn", p.memory_ref_host(lp, la, self.layer_bytes), self.layout()])
        return p.register(self.namespace(model_id), layers)

    def blocks(self, first_chunk_block: int, chunks: int) -> List[int]:
        return list(range(first_chunk_block, first_chunk_block + chunks * self.blocks_per_chunk))

    def block_extents(self, blocks: Iterable[int]) -> List[Tuple[int, int]]:
        """(offset, length) of every given block in every layer: the bytes a LOAD into them writes."""
        return [(layer * self.layer_bytes + b * self.block_bytes, self.block_bytes)
                for layer in range(self.num_layers) for b in blocks]

    def tokens(self, seed: Any, chunks: int) -> List[int]:
        return tokens_for(seed, chunks * self.chunk_tokens)


GEOMETRY = Geometry()


def samples_of(read: Callable[[int, int], bytes], geometry: Geometry, blocks: Iterable[int]) -> List[bytes]:
    """A 48-byte sample from the start of each given block in each layer: a victim's secret fingerprints."""
    return [read(off, 48) for off, _ in geometry.block_extents(blocks)]


def leaked(samples: Sequence[bytes], memory: bytes) -> int:
    """How many of a victim's secret samples occur in some other process's memory."""
    return sum(1 for s in samples if s in memory)


# ---------------------------------------------------------------------------------------------- sidecar

def shared_tmp() -> str:
    """A temporary directory that other users can traverse (every ancestor o+x), for the sidecar's socket
    and the agent's files: an attacker of another uid must reach them for the test to mean anything."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        path, ok = os.path.abspath(candidate), os.path.isdir(candidate)
        while ok and path != "/":
            ok = bool(os.stat(path).st_mode & 0o001)
            path = os.path.dirname(path)
        if ok:
            return candidate
    return tempfile.gettempdir()


TIGHT_MAX_CONNECTIONS = 16
TIGHT_MAX_LEASES = 8
TIGHT_MAX_CHUNK_BYTES = 1 << 20
TIGHT_SETTINGS = (f"MaxConnections={TIGHT_MAX_CONNECTIONS}", "HelloTimeout=00:00:01",
                  f"MaxLeasesPerConnection={TIGHT_MAX_LEASES}", f"MaxChunkBytes={TIGHT_MAX_CHUNK_BYTES}",
                  "SendTimeout=00:00:02")


def sidecar_dll() -> Optional[str]:
    try:
        from fake_engine.engine import sidecar_bin  # integration/conftest.py puts integration/ on sys.path
        return sidecar_bin()
    except ImportError:
        path = os.environ.get("KVSIDECAR_BIN") or os.path.join(os.path.dirname(os.path.dirname(HERE)), "out",
                                                                   "sidecar", "kvsidecar.dll")
        return path if os.path.exists(path) else None


class SidecarStartError(RuntimeError):
    def __init__(self, message: str, returncode: Optional[int], log: str):
        super().__init__(f"{message} (exit code {returncode}):\n{log[-4000:]}")
        self.returncode = returncode
        self.log = log


class Sidecar:
    """A kvsidecar process on a private socket, started with ``--Sidecar:<Name>=<value>`` settings.

    The socket's directory is made traversable (0755) so that a process of another uid in the socket's
    group can connect to the 0660 socket."""

    def __init__(self, *settings: str, capacity_bytes: int = 64 * MiB, extent_bytes: Optional[int] = None,
                 ready_timeout: float = 30.0, name: str = "sidecar"):
        self.dll = sidecar_dll()
        if self.dll is None:
            raise FileNotFoundError("kvsidecar.dll not found: run scripts/publish.sh or set KVSIDECAR_BIN")
        self.name = name
        self.settings = settings
        self.capacity_bytes = capacity_bytes
        self.dir = tempfile.mkdtemp(prefix="kvsc-hostile-", dir=shared_tmp())
        os.chmod(self.dir, 0o755)
        self.socket_path = os.path.join(self.dir, "s.sock")
        self.lines: List[str] = []
        self._ready = threading.Event()
        args = ["dotnet", self.dll, "--socket", self.socket_path, "--capacity-bytes", str(capacity_bytes),
                "--extent-bytes", str(extent_bytes or min(capacity_bytes, 64 * MiB))]
        args += [s if s.startswith("--") else f"--Sidecar:{s}" for s in settings]
        self.args = args
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace")
        self.pid = self.proc.pid
        threading.Thread(target=self._read_output, daemon=True, name=f"{name}-log").start()
        ready = wait_until(lambda: self._ready.is_set() or self.proc.poll() is not None, ready_timeout)
        if not self._ready.is_set():
            code = self.proc.poll()
            if code is None:
                self.kill()
            self.proc.wait(timeout=10)
            raise SidecarStartError("the sidecar did not print READY" if ready else
                                    f"the sidecar was not READY within {ready_timeout:.0f} s", self.proc.returncode,
                                    self.log())

    def _read_output(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("READY "):
                self._ready.set()

    # -- process
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, last: int = 60) -> str:
        return "".join(self.lines[-last:])

    def _status_kb(self, key: str) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return -1

    def rss_bytes(self) -> int:
        """VmRSS now."""
        return self._status_kb("VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        """VmHWM: the most resident memory the daemon ever had."""
        return self._status_kb("VmHWM") * 1024

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)

    # -- clients
    def connect(self, timeout: float = 5.0) -> RawConn:
        return RawConn(self.socket_path, timeout)

    def client(self, instance: Optional[str] = None, role: str = "client", timeout: float = 5.0) -> RawConn:
        """A connection that said HELLO (raises if the HELLO failed)."""
        c = self.connect(timeout)
        r = c.hello(instance or unique("client"), role, timeout=timeout)
        if not r.ok:
            c.close()
            raise AssertionError(f"HELLO of a well-behaved client failed: {code_name(r.code)} {r.describe()}")
        return c

    def stats(self, timeout: float = 5.0) -> "Stats":
        """STATS by name from a fresh connection; a field this server does not send is None, and when STATS
        cannot be had at all every field is None and ``error`` says why (a containment failure, not a crash)."""
        try:
            with RawConn(self.socket_path, timeout) as c:
                hello = c.hello(unique("stats"), "client", timeout=timeout)
                r = c.call(Op.STATS, None, timeout) if hello.ok else hello
        except OSError as e:
            return Stats.unavailable(f"connect failed: {e}")
        if not r.ok:
            return Stats.unavailable(f"{code_name(r.code)} {r.describe()}")
        return Stats({name: p.field(r.fields, i) for i, name in enumerate(p.STATS_FIELDS)})

    def wait_stat(self, name: str, predicate: Callable[[int], bool], timeout: float) -> Tuple[bool, Any]:
        """Polls STATS until ``predicate(value of name)`` holds; (whether it did, the last value or why there was none)."""
        last: List[Any] = [None]

        def probe() -> bool:
            stats = self.stats()
            value = stats.get(name)
            last[0] = value if value is not None else (stats.error or "not sent by this server")
            return value is not None and predicate(value)

        return bool(wait_until(probe, timeout, interval=0.1)), last[0]

    def serve_check(self, timeout: float = 5.0) -> Tuple[bool, str]:
        """Whether a fresh well-behaved client gets HELLO, PING and LOOKUP answered within ``timeout`` in all."""
        if not self.alive():
            return False, f"the sidecar exited with {self.proc.returncode}:\n{self.log()}"
        t0 = time.monotonic()
        try:
            c = RawConn(self.socket_path, timeout)
        except OSError as e:
            return False, f"connect failed: {e}"
        with c:
            steps = [("HELLO", lambda left: c.hello(unique("probe"), "scheduler", timeout=left)),
                     ("PING", lambda left: c.call(Op.PING, [0xC0FFEE], left)),
                     ("LOOKUP", lambda left: c.call(Op.LOOKUP, p.lookup("probe", None, tb(range(64)), False), left))]
            for name, step in steps:
                left = timeout - (time.monotonic() - t0)
                r = step(max(left, 0.01))
                if not r.ok:
                    return False, f"a fresh client's {name} got {code_name(r.code)} {r.describe()} " \
                                  f"after {time.monotonic() - t0:.2f} s"
        return True, f"served in {time.monotonic() - t0:.2f} s"


class Stats(dict):
    """STATS fields by name (None: not sent by this server)."""

    error = ""

    @classmethod
    def unavailable(cls, why: str) -> "Stats":
        s = cls({name: None for name in p.STATS_FIELDS})
        s.error = f"STATS unavailable: {why}"
        return s


def stat_check(checks: Checks, before: Stats, after: Stats, name: str, op: str = "==", delta: int = 0,
               why: str = "") -> bool:
    """STATS ``name`` after ``op`` (its value before + ``delta``), e.g. ("chunks", "==") or ("registrations", "<=", 1)."""
    b, a = before.get(name), after.get(name)
    if a is None or b is None:
        return checks.check(False, f"STATS {name}: {before.error or after.error or 'no such field'}")
    ok = {"==": a == b + delta, "<=": a <= b + delta, "<": a < b + delta, ">=": a >= b + delta}[op]
    return checks.check(ok, f"STATS {name} went {b} -> {a}, expected {op} {b + delta}" + (f": {why}" if why else ""))


def counters_moved(checks: Checks, before: Stats, after: Stats, names: Sequence[str], by: int = 1) -> None:
    for name in names:
        b, a = before.get(name), after.get(name)
        if a is None:
            checks.check(False, f"STATS {name} (field {p.STATS_FIELDS.index(name)}): "
                                f"{after.error or 'not sent by this server'}")
        else:
            checks.check(a - (b or 0) >= by, f"STATS {name} moved by {a - (b or 0)}, expected at least {by}")


def check_serving(checks: Checks, sidecar: Sidecar, timeout: float = 5.0) -> None:
    ok, detail = sidecar.serve_check(timeout)
    checks.check(ok, f"the sidecar does not serve a fresh client: {detail}")


# ---------------------------------------------------------------------------------------------- agents

_AGENT_DIR: Optional[str] = None


def agent_dir() -> str:
    """A world-readable copy of agent.py, this module and the protocol module: a process of another uid
    must be able to run them even where the checkout is private to root."""
    global _AGENT_DIR
    if _AGENT_DIR is None:
        d = tempfile.mkdtemp(prefix="kvsc-agent-", dir=shared_tmp())
        os.chmod(d, 0o755)
        os.makedirs(os.path.join(d, "csharp_kv"), mode=0o755)
        os.chmod(os.path.join(d, "csharp_kv"), 0o755)
        copies = [(os.path.join(HERE, "agent.py"), "agent.py"), (os.path.abspath(__file__), "harness.py"),
                  (p.__file__, os.path.join("csharp_kv", "protocol.py"))]
        for src, dst in copies:
            shutil.copyfile(src, os.path.join(d, dst))
        with open(os.path.join(d, "csharp_kv", "__init__.py"), "w") as f:
            f.write("")
        for root, _, files in os.walk(d):
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        atexit.register(shutil.rmtree, d, True)
        _AGENT_DIR = d
    return _AGENT_DIR


def foreign_uid_unavailable() -> Optional[str]:
    """Why this run cannot start a process of another uid (None when it can)."""
    if os.geteuid() != 0:
        return "needs root to start an attacker process under another uid (CI runs the tests as root)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return None


class AgentError(RuntimeError):
    pass


class Agent:
    """An engine-like process of its own (``agent.py``), optionally under another uid, driven over its
    stdin/stdout with length-prefixed msgpack commands. Every command has a deadline."""

    def __init__(self, name: str = "agent", uid: Optional[int] = None, gid: int = 0, timeout: float = 20.0):
        self.name = name
        script = os.path.join(agent_dir(), "agent.py")
        cmd = [sys.executable, "-B", "-s", script]
        if uid is not None:
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"] + cmd
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     cwd=agent_dir())
        info = self._read(timeout)
        if not isinstance(info, dict):
            raise AgentError(f"{name} did not start: {info!r}\n{self.stderr_text()}")
        self.pid: int = info["pid"]
        self.uid: int = info["uid"]
        self.address: int = 0

    # -- transport
    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        out = bytearray()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AgentError(f"{self.name} did not answer in time\n{self.stderr_text()}")
            chunk = os.read(fd, n - len(out))
            if not chunk:
                raise AgentError(f"{self.name} exited (code {self.proc.poll()})\n{self.stderr_text()}")
            out += chunk
        return bytes(out)

    def _read(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        (n,) = struct.unpack("<I", self._read_exact(4, deadline))
        return msgpack.unpackb(self._read_exact(n, deadline), raw=False, strict_map_key=False)

    def rpc(self, *command: Any, timeout: float = 20.0) -> Any:
        data = msgpack.packb(list(command), use_bin_type=True)
        try:
            self.proc.stdin.write(struct.pack("<I", len(data)) + data)
            self.proc.stdin.flush()
        except OSError as e:
            raise AgentError(f"{self.name} is gone ({e})\n{self.stderr_text()}") from None
        status, value = self._read(timeout)
        if status != "ok":
            raise AgentError(f"{self.name}: {command[0]} failed: {value}")
        return value

    def stderr_text(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read().decode(errors="replace")[-3000:]
        except (OSError, ValueError):
            return ""

    # -- memory
    def alloc(self, nbytes: int, seed: Any) -> int:
        self.address = self.rpc("alloc", nbytes, str(seed))
        return self.address

    def read(self, offset: int, length: int) -> bytes:
        return self.rpc("read", offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.rpc("write", offset, data)

    def digest(self) -> str:
        return self.rpc("digest")

    def grant_ptrace(self, sidecar_pid: int) -> bool:
        return self.rpc("grant_ptrace", sidecar_pid)

    # -- connections
    def connect(self, conn: str, socket_path: str) -> None:
        self.rpc("connect", conn, socket_path)

    def call(self, conn: str, opcode: int, fields: Optional[Sequence] = None, timeout: float = 5.0) -> Reply:
        code, message, fields = self.rpc("call", conn, int(opcode), fields, timeout, timeout=timeout + 10)
        return Reply(code, fields or [], message or "")

    def hello(self, conn: str, instance_id: str, role: str = "worker", rank: int = 0) -> Reply:
        return self.call(conn, Op.HELLO, p.hello(instance_id, role, rank, self.pid, engine_kind="test"))

    def send_frames(self, conn: str, frames: Sequence[Tuple[int, Optional[Sequence]]], timeout: float = 2.0) -> int:
        """Sends frames without reading any reply; returns how many went out before ``timeout``."""
        return self.rpc("send_frames", conn, [[int(o), f] for o, f in frames], timeout, timeout=timeout + 20)

    def close_conn(self, conn: str) -> None:
        self.rpc("close", conn)

    # -- lifetime
    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.rpc("exit", timeout=5)
            except AgentError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.stderr.close()


def require(reply: Reply, what: str) -> Reply:
    """A setup step that must work for the test to mean anything."""
    if not reply.ok:
        raise AssertionError(f"setup failed: {what}: {code_name(reply.code)} {reply.describe()}")
    return reply


class Victim:
    """A legitimate engine worker in a process of its own: its KV memory holds a secret pattern, it grants
    the sidecar ptrace access, registers that memory, stores ``chunks`` chunks under cache_salt 'victim'
    from blocks 0.., and keeps a scheduler connection of the same instance for its lookups."""

    SALT = "victim"

    def __init__(self, sidecar: Sidecar, name: str = "victim", geometry: Geometry = GEOMETRY, chunks: int = 4):
        self.sidecar = sidecar
        self.geometry = geometry
        self.chunks = chunks
        self.instance = unique(f"victim-{name}"[:40])
        self.agent = Agent(name=f"victim {name}")
        try:
            self.address = self.agent.alloc(geometry.total_bytes, self.instance)
            self.agent.connect("worker", sidecar.socket_path)
            hello = require(self.agent.hello("worker", self.instance, "worker"), "victim HELLO")
            self.sidecar_pid = hello.get(5)
            self.agent.grant_ptrace(self.sidecar_pid)
            reg = require(self.worker(Op.REGISTER, geometry.register_fields(self.agent.pid, self.address)),
                          "victim REGISTER of its own memory")
            self.fingerprint = reg.get(1)
            self.all_tokens = geometry.tokens(self.instance, chunks + 2)  # 2 more chunks a test may store later
            self.tokens = self.all_tokens[:chunks * geometry.chunk_tokens]
            stored = require(self.worker(Op.STORE, p.store("victim-store", self.SALT, tb(self.tokens), 0, chunks,
                                                           bb(geometry.blocks(0, chunks)))), "victim STORE")
            if stored.get(0) != chunks:
                raise AssertionError(f"setup failed: the victim stored {stored.fields!r}, expected {chunks} chunks")
            self.agent.connect("scheduler", sidecar.socket_path)
            require(self.agent.hello("scheduler", self.instance, "scheduler"), "victim scheduler HELLO")
            self.baseline = self.agent.digest()
            self.stored_blocks = geometry.blocks(0, chunks)
            self.secret = samples_of(self.agent.read, geometry, self.stored_blocks)
        except BaseException:
            self.agent.kill()
            raise

    def worker(self, opcode: int, fields: Optional[Sequence] = None, timeout: float = 5.0) -> Reply:
        return self.agent.call("worker", opcode, fields, timeout)

    def scheduler(self, opcode: int, fields: Optional[Sequence] = None, timeout: float = 5.0) -> Reply:
        return self.agent.call("scheduler", opcode, fields, timeout)

    def lookup(self, tokens: Optional[Sequence[int]] = None, lease: bool = False, request_id: str = "victim-req",
               timeout: float = 5.0) -> Reply:
        return self.scheduler(Op.LOOKUP, p.lookup(request_id, self.SALT, tb(self.tokens if tokens is None else tokens),
                                                  lease), timeout)

    def hits(self, timeout: float = 5.0) -> int:
        r = self.lookup(timeout=timeout)
        return r.get(1, -1) if r.ok else -1

    def memory_unchanged(self) -> bool:
        return self.agent.digest() == self.baseline

    def check_intact(self, checks: Checks, memory: bool = True) -> None:
        """The victim's memory is what it was after setup and its lookups still hit every stored chunk."""
        if memory:
            checks.check(self.memory_unchanged(), "the victim's KV memory changed")
        hits = self.hits()
        checks.check(hits == self.chunks, f"the victim's LOOKUP hits {hits} chunks, expected {self.chunks}")

    def close(self) -> None:
        self.agent.stop()
