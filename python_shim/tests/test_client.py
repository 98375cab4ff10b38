"""The client never makes its caller wait for a connection or for a sidecar that stopped reading.

A small sidecar stand-in on a real Unix socket controls exactly when HELLO is answered and whether
requests are read, so each property is checked by what the client does while the stand-in holds back,
not by timing."""

import threading
import time

import pytest

from csharp_kv import protocol as p
from csharp_kv.client import UNAVAILABLE, SidecarClient
from stand_in import StandIn

WATCHDOG = 10.0  # seconds: only a guard against a hang, never a performance bound


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
