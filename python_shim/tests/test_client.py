"""The client never makes its caller wait for a connection or for a sidecar that stopped reading.

A small sidecar stand-in on a real Unix socket controls exactly when HELLO is answered and whether
requests are read, so each property is checked by what the client does while the stand-in holds back,
not by timing."""

import os
import socket
import threading
import time

import pytest

from csharp_kv import protocol as p
from csharp_kv.client import UNAVAILABLE, SidecarClient

WATCHDOG = 10.0  # seconds: only a guard against a hang, never a performance bound


class StandIn:
    """Accepts connections; answers HELLO once ``hello`` is set; answers PING/STORE with an empty reply while
    ``reading`` is set, and stops reading from its sockets when it is cleared."""

    def __init__(self, path):
        self.path = path
        self.hello = threading.Event()
        self.reading = threading.Event()
        self.reading.set()
        self.connections = 0
        self.requests = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(8)
        self._socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            self._socks.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        try:
            while True:
                self.reading.wait()
                data = conn.recv(1 << 16)
                if not data:
                    return
                buf += data
                while len(buf) >= p.HEADER_SIZE:
                    h = p.decode_header(buf)
                    if len(buf) < p.HEADER_SIZE + h.body_length:
                        break
                    buf = buf[p.HEADER_SIZE + h.body_length:]
                    if h.opcode == p.Opcode.HELLO:
                        self.hello.wait()
                        fields = [1, "stand-in", [], 64 << 20, 1, os.getpid()]
                    else:
                        self.requests.append(h.opcode)
                        fields = [0, 0, 0] if h.opcode == p.Opcode.STORE else []
                    conn.sendall(p.encode_frame(h.opcode, h.request_id, fields, flags=p.FLAG_REPLY))
        except OSError:
            return

    def drop_all(self):
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._socks.clear()

    def close(self):
        self._server.close()
        self.drop_all()


@pytest.fixture
def stand_in(tmp_path):
    s = StandIn(str(tmp_path / "s.sock"))
    yield s
    s.hello.set()
    s.reading.set()
    s.close()


def in_thread(fn):
    """Runs fn on a thread; returns its result, failing the test if it does not return (a hang)."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    t.start()
    t.join(WATCHDOG)
    assert not t.is_alive(), "the call blocked"
    return out["value"]


def client(path, **kwargs):
    kwargs.setdefault("retry_interval", 0.01)
    return SidecarClient(path, "engine", "scheduler", connect_timeout=WATCHDOG, **kwargs)


def test_submit_while_hello_is_unanswered_returns_unavailable_at_once(stand_in):
    c = client(stand_in.path)
    try:
        first = in_thread(lambda: c.submit(p.Opcode.PING, [1]).result(WATCHDOG))
        assert first.error_code == UNAVAILABLE and not c.connected
        # The connect goes on in the background, and HELLO is still held: the caller did not wait for it.
        for _ in range(int(WATCHDOG / 0.01)):
            if stand_in.connections:
                break
            time.sleep(0.01)
        assert stand_in.connections == 1 and not c.connected
        stand_in.hello.set()
        assert c.ensure_connected(wait=WATCHDOG)
        assert c.call(p.Opcode.PING, [2], timeout=WATCHDOG).ok
    finally:
        c.close()


def test_queued_request_goes_out_once_the_connection_is_ready(stand_in):
    c = client(stand_in.path)
    try:
        c.ensure_connected()
        fut = in_thread(lambda: c.submit(p.Opcode.STORE, p.store("r", None, b"", 0, 0, b""), queue=True))
        assert not fut.done()
        stand_in.hello.set()
        assert fut.result(WATCHDOG).ok
        assert p.Opcode.STORE in stand_in.requests
    finally:
        c.close()


def test_lost_connection_reconnects_in_the_background(stand_in):
    stand_in.hello.set()
    c = client(stand_in.path)
    try:
        assert c.ensure_connected(wait=WATCHDOG)
        stand_in.drop_all()
        for _ in range(int(WATCHDOG / 0.02)):
            if c.ensure_connected(wait=0.02) and c.counters.reconnects == 1:
                break
            time.sleep(0.02)
        assert c.connected and c.counters.reconnects == 1
        assert stand_in.connections == 2
        assert c.call(p.Opcode.PING, [1], timeout=WATCHDOG).ok
    finally:
        c.close()


def test_sidecar_that_stops_reading_is_dropped_not_waited_for(stand_in):
    stand_in.hello.set()
    c = client(stand_in.path, send_timeout=0.05)
    try:
        assert c.ensure_connected(wait=WATCHDOG)
        stand_in.reading.clear()
        big = p.store("r", None, bytes(1 << 20), 0, 0, b"")

        def flood():
            for _ in range(64):  # 64 MiB: far beyond any socket buffer
                reply_fut = c.submit(p.Opcode.STORE, big)
                if reply_fut.done() and reply_fut.result().error_code == UNAVAILABLE:
                    return reply_fut.result()
            return None

        reply = in_thread(flood)
        # The frames the socket did not take waited in a bounded backlog; then the client gave up the sidecar.
        assert reply is not None and reply.error_code == UNAVAILABLE
        assert not c.connected
    finally:
        c.close()
