"""A thread-safe client of the sidecar's Unix socket: one connection, many requests in flight,
replies matched by request id on a reader thread. Sidecar failures never raise into the caller:
every call returns a :class:`Reply` that says whether it worked."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

from . import protocol as p

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    """The outcome of one request: ``fields`` on success, else ``error_code``/``error`` (code -1 means
    no answer: the sidecar is unavailable, the connection broke, or the call timed out)."""

    fields: list = field(default_factory=list)
    error_code: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.error_code == 0

    def get(self, index: int, default=None):
        return p.field(self.fields, index, default)


UNAVAILABLE = -1


@dataclass
class ClientCounters:
    connects: int = 0
    reconnects: int = 0
    disconnects: int = 0
    timeouts: int = 0
    errors: int = 0
    unavailable: int = 0


class SidecarClient:
    """Connects lazily, reconnects with a backoff (never more than one attempt per ``retry_interval``),
    and runs ``on_connect(client)`` after each HELLO (a worker re-registers its memory there)."""

    def __init__(self, socket_path: str, instance_id: str, role: str, rank: int = 0,
                 engine_version: str = "", connect_timeout: float = 1.0, retry_interval: float = 1.0,
                 on_connect: Optional[Callable[["SidecarClient"], None]] = None):
        self.socket_path = socket_path
        self.instance_id = instance_id
        self.role = role
        self.rank = rank
        self.engine_version = engine_version
        self.connect_timeout = connect_timeout
        self.retry_interval = retry_interval
        self.on_connect = on_connect
        self.counters = ClientCounters()
        self.server_pid: Optional[int] = None
        self.max_frame_bytes = 64 << 20
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._pending: Dict[int, Future] = {}
        self._next_id = 0
        self._last_attempt = float("-inf")
        self._generation = 0
        self._warned = False
        self._closed = False

    # ------------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def ensure_connected(self, force: bool = False) -> bool:
        """Connects if not connected and the backoff allows; True when connected."""
        if self._sock is not None:
            return True
        with self._lock:
            if self._sock is not None:
                return True
            if self._closed:
                return False
            now = time.monotonic()
            if not force and now - self._last_attempt < self.retry_interval:
                return False
            self._last_attempt = now
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout)
                sock.connect(self.socket_path)
                sock.settimeout(None)
            except OSError as e:
                if not self._warned:
                    logger.warning("kvsidecar: cannot reach the sidecar at %s (%s); running without the KV cache "
                                   "(every lookup is a miss) and retrying every %.0f s", self.socket_path, e,
                                   self.retry_interval)
                    self._warned = True
                return False
            self._sock = sock
            self._generation += 1
            generation = self._generation
            threading.Thread(target=self._read_loop, args=(sock, generation), daemon=True,
                             name="kvsidecar-reader").start()
        reply = self.call(p.Opcode.HELLO, p.hello(self.instance_id, self.role, self.rank, os.getpid(),
                                                    engine_version=self.engine_version), timeout=self.connect_timeout)
        if not reply.ok:
            logger.warning("kvsidecar: HELLO failed (%s); disconnecting", reply.error)
            self._drop(generation, ConnectionError("HELLO failed"))
            return False
        self.server_pid = reply.get(5)
        self.max_frame_bytes = reply.get(3, self.max_frame_bytes)
        if self.counters.connects > 0:
            self.counters.reconnects += 1
            logger.info("kvsidecar: reconnected to %s", self.socket_path)
        elif self._warned:
            logger.info("kvsidecar: connected to %s", self.socket_path)
        self.counters.connects += 1
        self._warned = False
        if self.on_connect is not None:
            try:
                self.on_connect(self)
            except Exception:  # noqa: BLE001 - a cache must never take the engine down
                logger.exception("kvsidecar: the on-connect hook failed")
        return self._sock is not None

    def close(self) -> None:
        self._closed = True
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._fail_all(ConnectionError("client closed"))

    # ------------------------------------------------------------------ requests

    def submit(self, opcode: int, fields: Optional[Sequence] = None) -> "Future[Reply]":
        """Sends a request; the future resolves to a :class:`Reply` (never raises)."""
        fut: Future = Future()
        if self._sock is None and not self.ensure_connected():
            self.counters.unavailable += 1
            fut.set_result(Reply(error_code=UNAVAILABLE, error="sidecar unavailable"))
            return fut
        with self._send_lock:
            sock = self._sock
            if sock is None:
                fut.set_result(Reply(error_code=UNAVAILABLE, error="sidecar unavailable"))
                return fut
            self._next_id += 1
            request_id = self._next_id
            self._pending[request_id] = fut
            try:
                sock.sendall(p.encode_frame(opcode, request_id, fields))
            except OSError as e:
                self._pending.pop(request_id, None)
                fut.set_result(Reply(error_code=UNAVAILABLE, error=f"send failed: {e}"))
                self._drop(self._generation, e)
        return fut

    def call(self, opcode: int, fields: Optional[Sequence] = None, timeout: float = 5.0) -> Reply:
        return self.wait(self.submit(opcode, fields), timeout)

    def wait(self, fut: "Future[Reply]", timeout: float) -> Reply:
        try:
            return fut.result(timeout=timeout)
        except Exception:  # noqa: BLE001 - concurrent.futures.TimeoutError and friends
            self.counters.timeouts += 1
            return Reply(error_code=UNAVAILABLE, error=f"no reply within {timeout:.3f} s")

    # ------------------------------------------------------------------ reader

    def _read_loop(self, sock: socket.socket, generation: int) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("the sidecar closed the connection")
                buf += chunk
                while len(buf) >= p.HEADER_SIZE:
                    header = p.decode_header(buf)
                    end = p.HEADER_SIZE + header.body_length
                    if len(buf) < end:
                        break
                    body = bytes(buf[p.HEADER_SIZE:end])
                    del buf[:end]
                    fut = self._pending.pop(header.request_id, None)
                    if fut is None:
                        continue
                    fields = p.decode_body(body)
                    if header.flags & p.FLAG_ERROR:
                        self.counters.errors += 1
                        fut.set_result(Reply(fields=fields, error_code=int(p.field(fields, 0, p.ErrorCode.INTERNAL)),
                                             error=str(p.field(fields, 1, ""))))
                    else:
                        fut.set_result(Reply(fields=fields))
        except (OSError, ConnectionError, p.ProtocolError, ValueError) as e:
            self._drop(generation, e)

    def _drop(self, generation: int, cause: Exception) -> None:
        with self._lock:
            if generation != self._generation or self._sock is None:
                return
            sock, self._sock = self._sock, None
            self._last_attempt = time.monotonic()
        self.counters.disconnects += 1
        if not self._closed:
            logger.warning("kvsidecar: lost the connection to the sidecar (%s); pending transfers fall back to "
                           "recompute", cause)
        try:
            sock.close()
        except OSError:
            pass
        self._fail_all(cause)

    def _fail_all(self, cause: Exception) -> None:
        for request_id in list(self._pending):
            fut = self._pending.pop(request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(Reply(error_code=UNAVAILABLE, error=f"connection lost: {cause}"))
