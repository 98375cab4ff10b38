"""Engine-like processes of their own for the hostile tests (``agent.py``, driven over its stdin/stdout):
attackers, optionally under another uid, and the victim engine whose memory and cache an attack must not
reach."""

from __future__ import annotations

import atexit
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence, Tuple

import msgpack

from daemon import Checks, Sidecar, shared_tmp
from pool import GEOMETRY, Geometry, HostBuffer, bb, samples_of, tb
from wire import Op, RawConn, Reply, code_name, p, unique

HERE = os.path.dirname(os.path.abspath(__file__))
FOREIGN_UID = 65534  # nobody
AGENT_MODULES = ("agent.py", "wire.py", "pool.py")  # agent.py and what it imports from this folder

_AGENT_DIR: Optional[str] = None


def agent_dir() -> str:
    """A world-readable copy of agent.py, the modules it imports and the protocol module: a process of
    another uid must be able to run them even where the checkout is private to root."""
    global _AGENT_DIR
    if _AGENT_DIR is None:
        d = tempfile.mkdtemp(prefix="kvsc-agent-", dir=shared_tmp())
        os.chmod(d, 0o755)
        os.makedirs(os.path.join(d, "csharp_kv"), mode=0o755)
        os.chmod(os.path.join(d, "csharp_kv"), 0o755)
        copies = [(os.path.join(HERE, name), name) for name in AGENT_MODULES]
        copies.append((p.__file__, os.path.join("csharp_kv", "protocol.py")))
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


def register_own(conn: RawConn, memory: HostBuffer, geometry: Geometry = GEOMETRY,
                 what: str = "the attacker's REGISTER of its own memory") -> Reply:
    """REGISTER of this process's own ``memory`` on ``conn``, which must work."""
    return require(conn.call(Op.REGISTER, geometry.register_fields(os.getpid(), memory.address)), what)


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
