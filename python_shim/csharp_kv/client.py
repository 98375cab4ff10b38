"""A thread-safe client of the sidecar's Unix socket: one connection, many requests in flight,
replies matched by request id on a reader thread. Sidecar failures never raise into the caller:
every call returns a :class:`Reply` that says whether it worked."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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

# Bytes of frames that may wait for a sidecar that is slow to read; beyond, the connection is dropped.
_MAX_BACKLOG_BYTES = 16 << 20

# Requests that may wait for a connection under way (stores); more fail at once.
_MAX_QUEUED = 1024

# The reader's receive timeout: only a wake-up to wait again; a dropped connection ends the wait at once.
_READ_WAKEUP = 3600.0


@dataclass
class ClientCounters:
    connects: int = 0
    reconnects: int = 0
    disconnects: int = 0
    timeouts: int = 0
    errors: int = 0
    unavailable: int = 0


class SidecarClient:
    """Connects in the background (never in the caller's thread: at most one attempt per ``retry_interval``,
    100 ms by default, started on demand), sends with ``send_timeout`` (a sidecar that stops reading is
    dropped, never waited for), and runs ``on_connect(client)`` after each HELLO on the connecting thread (a
    worker re-registers its memory there)."""

    def __init__(self, socket_path: str, instance_id: str, role: str, rank: int = 0,
                 engine_version: str = "", connect_timeout: float = 1.0, retry_interval: float = 0.1,
                 on_connect: Optional[Callable[["SidecarClient"], None]] = None, send_timeout: float = 1.0):
        self.socket_path = socket_path
        self.instance_id = instance_id
        self.role = role
        self.rank = rank
        self.engine_version = engine_version
        self.connect_timeout = connect_timeout
        self.retry_interval = retry_interval
        self.send_timeout = send_timeout
        self.on_connect = on_connect
        self.counters = ClientCounters()
        self.server_pid: Optional[int] = None
        self.server_capabilities: tuple = ()
        self.max_frame_bytes = 64 << 20
        self._lock = threading.Lock()
        self._send_lock = threading.RLock()
        self._sock: Optional[socket.socket] = None
        self._send_sock: Optional[socket.socket] = None
        self._pending: Dict[int, Future] = {}
        self._next_id = 0
        self._last_attempt = float("-inf")
        self._generation = 0
        self._warned = False
        self._closed = False
        self._connecting: Optional[threading.Thread] = None
        self._connecting_ident = 0
        self._ready = threading.Event()
        self._queued: List[Tuple[int, Optional[Sequence], Future]] = []
        self._backlog: "deque[memoryview]" = deque()
        self._backlog_bytes = 0
        self._backlog_ready = threading.Condition(self._send_lock)
        self._writer: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def ensure_connected(self, wait: float = 0.0) -> bool:
        """True when connected. Otherwise starts a background connect (unless one runs, or the last attempt was
        less than ``retry_interval`` ago) and waits for it at most ``wait`` seconds (0: not at all)."""
        if self._ready.is_set():
            return True
        with self._lock:
            if self._closed:
                return False
            thread = self._connecting
            now = time.monotonic()
            if thread is None and now - self._last_attempt >= self.retry_interval:
                self._last_attempt = now
                thread = self._connecting = threading.Thread(target=self._connect, daemon=True,
                                                             name="kvsidecar-connect")
                thread.start()
        if wait > 0 and thread is not None and thread is not threading.current_thread():
            thread.join(wait)  # ends early when the attempt fails (no sidecar) or succeeds
        return self._ready.is_set()

    def _connect(self) -> None:
        self._connecting_ident = threading.get_ident()
        try:
            self._connect_once()
        finally:
            with self._lock:
                self._connecting = None
                queued, self._queued = self._queued, []
            # Requests that waited for this attempt go out now, or fail if it failed.
            for opcode, fields, fut in queued:
                if self._ready.is_set():
                    self._send(opcode, fields).add_done_callback(lambda f, fut=fut: fut.set_result(f.result()))
                else:
                    fut.set_result(Reply(error_code=UNAVAILABLE, error="sidecar unavailable"))

    def _connect_once(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self.socket_path)
            # Sends go through duplicates that share the descriptor's non-blocking mode, so the reader waits with
            # a long timeout of its own (and simply waits again when it expires).
            sock.settimeout(_READ_WAKEUP)
            send_sock = sock.dup()
            # Callers try a non-blocking send (Python would otherwise wait out the socket's timeout on EAGAIN);
            # the writer thread sends the rest through the duplicate with send_timeout.
            send_sock.settimeout(0.0)
        except OSError as e:
            sock.close()
            if not self._warned:
                logger.warning("kvsidecar: cannot reach the sidecar at %s (%s); running without the KV cache "
                               "(every lookup is a miss) and retrying every %.0f ms", self.socket_path, e,
                               self.retry_interval * 1000)
                self._warned = True
            return
        with self._lock:
            if self._closed:
                sock.close()
                send_sock.close()
                return
            self._sock, self._send_sock = sock, send_sock
            self._generation += 1
            generation = self._generation
        threading.Thread(target=self._read_loop, args=(sock, generation), daemon=True,
                         name="kvsidecar-reader").start()
        reply = self.wait(self._send(p.Opcode.HELLO, p.hello(self.instance_id, self.role, self.rank, os.getpid(),
                                                              engine_version=self.engine_version)),
                          self.connect_timeout)
        if not reply.ok:
            logger.warning("kvsidecar: HELLO failed (%s); disconnecting", reply.error)
            self._drop(generation, ConnectionError("HELLO failed"))
            return
        self.server_pid = reply.get(5)
        self.server_capabilities = tuple(reply.get(2) or ())
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
        with self._lock:
            if generation == self._generation and self._sock is not None:
                self._ready.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sock, send_sock = self._sock, self._send_sock
            self._sock = self._send_sock = None
            self._ready.clear()
        for s in (send_sock, sock):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        self._fail_all(ConnectionError("client closed"))

    # ------------------------------------------------------------------ requests

    def submit(self, opcode: int, fields: Optional[Sequence] = None, queue: bool = False) -> "Future[Reply]":
        """Sends a request; the future resolves to a :class:`Reply` (never raises). Never blocks on a connect:
        while one is under way the request fails at once, or with ``queue`` waits for it (up to
        ``_MAX_QUEUED`` requests) and goes out as soon as the connection is ready."""
        # The connecting thread itself may send (the on-connect hook registers memory) before the client is ready.
        if not self._ready.is_set() and threading.get_ident() != self._connecting_ident and not self.ensure_connected():
            fut: Future = Future()
            with self._lock:
                if queue and self._connecting is not None and len(self._queued) < _MAX_QUEUED:
                    self._queued.append((opcode, fields, fut))
                    return fut
            self.counters.unavailable += 1
            fut.set_result(Reply(error_code=UNAVAILABLE, error="sidecar unavailable"))
            return fut
        return self._send(opcode, fields)

    def _send(self, opcode: int, fields: Optional[Sequence]) -> "Future[Reply]":
        """Writes a frame without ever blocking the caller: what the socket does not take at once waits in a
        bounded backlog that a writer thread sends within ``send_timeout``."""
        fut: Future = Future()
        with self._send_lock:
            sock = self._send_sock
            if sock is None:
                fut.set_result(Reply(error_code=UNAVAILABLE, error="sidecar unavailable"))
                return fut
            self._next_id += 1
            request_id = self._next_id
            self._pending[request_id] = fut
            generation = self._generation
            frame = p.encode_frame(opcode, request_id, fields)
            try:
                if self._backlog:
                    sent = 0  # keep the order: behind what is already waiting
                else:
                    try:
                        sent = sock.send(frame, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                if sent < len(frame):
                    self._backlog_bytes += len(frame) - sent
                    if self._backlog_bytes > _MAX_BACKLOG_BYTES:
                        raise OSError(f"more than {_MAX_BACKLOG_BYTES} bytes wait for a sidecar that does not read")
                    self._backlog.append(memoryview(frame)[sent:])
                    self._backlog_ready.notify()
                    if self._writer is None:
                        slow = sock.dup()
                        slow.settimeout(self.send_timeout)
                        self._writer = threading.Thread(target=self._write_loop, args=(sock, slow, generation),
                                                        daemon=True, name="kvsidecar-writer")
                        self._writer.start()
            except OSError as e:
                self._pending.pop(request_id, None)
                fut.set_result(Reply(error_code=UNAVAILABLE, error=f"send failed: {e}"))
                self._drop(generation, e)
        return fut

    def _write_loop(self, sock: socket.socket, slow: socket.socket, generation: int) -> None:
        """Sends the backlog of one connection; a sidecar that takes nothing for ``send_timeout`` is dropped."""
        try:
            self._write_backlog(sock, slow, generation)
        finally:
            slow.close()

    def _write_backlog(self, sock: socket.socket, slow: socket.socket, generation: int) -> None:
        while True:
            with self._send_lock:
                while not self._backlog and generation == self._generation and self._send_sock is sock:
                    self._backlog_ready.wait()
                if generation != self._generation or self._send_sock is not sock:
                    return
                chunk = self._backlog[0]
            try:
                slow.sendall(chunk)  # within send_timeout
            except OSError as e:  # includes socket.timeout: a partial frame leaves the stream unusable
                self._drop(generation, e)
                return
            with self._send_lock:
                if self._backlog and self._backlog[0] is chunk:
                    self._backlog.popleft()
                    self._backlog_bytes -= len(chunk)

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
                try:
                    chunk = sock.recv(1 << 20)
                except socket.timeout:
                    continue
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
            sock, send_sock = self._sock, self._send_sock
            self._sock = self._send_sock = None
            self._ready.clear()
            # The next attempt may start at once: a restarted sidecar is found within one retry interval.
            self._last_attempt = float("-inf")
        with self._send_lock:
            self._backlog.clear()
            self._backlog_bytes = 0
            self._writer = None
            self._backlog_ready.notify_all()
        self.counters.disconnects += 1
        if not self._closed:
            logger.warning("kvsidecar: lost the connection to the sidecar (%s); pending transfers fall back to "
                           "recompute", cause)
        for s in (send_sock, sock):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self._fail_all(cause)

    def _fail_all(self, cause: Exception) -> None:
        for request_id in list(self._pending):
            fut = self._pending.pop(request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(Reply(error_code=UNAVAILABLE, error=f"connection lost: {cause}"))
