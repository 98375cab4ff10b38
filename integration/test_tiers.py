"""Storage below memory through the real sidecar process: a local disk tier and a real redis-server below a small
L1, driven by the fake vLLM engine through the real shim. The engine checks every byte its forward reads, so a chunk
served wrong (corrupt, partial, another namespace's) fails the test, not only a counter."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from fake_engine import api as fake_api
from fake_engine.engine import EngineOptions, FakeEngine, SidecarProcess
from fake_engine.sidecar import NOT_BUILT, read_stats, sidecar_bin

# 4 layers x (K, V) x 4 heads x 32 dims x 2 bytes = 2 KiB per token: a 64-token chunk is 128 KiB, and a 2 MiB L1
# holds 8 of them (one 1 MiB extent), so a few prompts push the first one out of memory.
GEOMETRY = dict(num_layers=4, num_heads=4, head_size=32, num_blocks=96)
L1_BYTES = 2 << 20


def prompt(n, seed):
    return [(seed * 7919 + i * 104729) % 30000 + 1000 for i in range(n)]


def run(engine, req_id, tokens, salt=None):
    from vllm.v1.request import Request

    engine.add(Request(req_id, tokens, max_tokens=3, cache_salt=salt))
    engine.run()
    assert req_id in {r.request_id for r in engine.scheduler.finished}
    assert engine.mismatches == [], "the forward read wrong KV:\n" + "\n".join(engine.mismatches)
    assert engine.violations == [], "\n".join(engine.violations)
    return next(r for r in engine.scheduler.finished if r.request_id == req_id)


def stats(socket_path):
    return read_stats(socket_path)[0]


def wait_for(condition, what, seconds=20):
    until = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < until, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def engines():
    made = []

    def make(socket_path):
        e = FakeEngine(socket_path, EngineOptions(**GEOMETRY))
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()
    fake_api.activate(None)


@pytest.fixture
def disk_dir():
    d = tempfile.mkdtemp(prefix="kvsc-disk-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def disk_sidecar(path, *extra):
    if sidecar_bin() is None:
        pytest.skip(NOT_BUILT)
    return SidecarProcess(capacity_bytes=L1_BYTES, extent_bytes=1 << 20,
                          extra_args=[f"--Sidecar:Disk:Path={path}", "--Sidecar:Disk:AdmitAfterSightings=1",
                                      "--Sidecar:Disk:SegmentBytes=1048576", *extra])


def test_disk_keeps_what_l1_evicted_and_serves_it_exactly_after_a_pending_lookup(engines, disk_dir):
    s = disk_sidecar(disk_dir)
    try:
        e = engines(s.socket_path)
        a = prompt(300, 1)
        run(e, "a", a)
        for i in range(4):  # push A out of L1
            run(e, f"other{i}", prompt(300, 10 + i))
        wait_for(lambda: stats(s.socket_path)["tiers"][0]["writes"] >= 4, "demoted chunks on disk")
        again = run(e, "a-again", a)
        assert again.num_external_computed_tokens == 256
        disk = stats(s.socket_path)["tiers"][0]
        assert disk["name"] == "disk" and disk["policy"] == "write-back"
        assert disk["promotions"] > 0 and disk["corrupt"] == 0
    finally:
        s.stop()


def test_a_tenant_never_gets_another_tenants_chunks_from_the_disk(engines, disk_dir):
    s = disk_sidecar(disk_dir)
    try:
        e = engines(s.socket_path)
        a = prompt(300, 7)
        run(e, "tenant-a", a, salt="tenant-a")
        for i in range(4):
            run(e, f"other{i}", prompt(300, 20 + i), salt="tenant-a")
        wait_for(lambda: stats(s.socket_path)["tiers"][0]["writes"] >= 4, "tenant A's chunks on disk")
        assert run(e, "tenant-b", a, salt="tenant-b").num_external_computed_tokens == 0
        assert run(e, "tenant-a-again", a, salt="tenant-a").num_external_computed_tokens == 256
    finally:
        s.stop()


def test_disk_survives_a_killed_sidecar_and_a_corrupted_record_is_never_served(engines, disk_dir):
    s = disk_sidecar(disk_dir, "--Sidecar:DiskWritePolicy=write-through")
    try:
        e = engines(s.socket_path)
        a, b = prompt(300, 2), prompt(300, 3)
        run(e, "a", a)
        run(e, "b", b)
        wait_for(lambda: stats(s.socket_path)["tiers"][0]["writes"] >= 8, "both prompts on disk")
        s.kill()
        # Flip bytes in the middle of every segment: whatever record they hit must read as corrupt, never as KV.
        for name in os.listdir(disk_dir):
            path = os.path.join(disk_dir, name)
            if os.path.isfile(path) and os.path.getsize(path) > (1 << 16) and "seg" in name:
                with open(path, "r+b") as f:
                    f.seek(os.path.getsize(path) // 2)
                    f.write(b"\xff" * 64)
        s.start()  # same socket, same disk directory: the index is recovered
        e2 = engines(s.socket_path)
        for req_id, tokens in (("a2", a), ("b2", b)):
            r = run(e2, req_id, tokens)  # the engine checks the bytes it loads
            assert r.num_external_computed_tokens in (0, 64, 128, 192, 256)
        disk = stats(s.socket_path)["tiers"][0]
        assert disk["promotions"] > 0, "nothing came back from the disk after the restart"
    finally:
        s.stop()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvsc-redis-")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(self._up, "redis-server to listen")

    def _up(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as c:
                c.sendall(b"PING\r\n")
                return c.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis():
    r = RedisServer()
    yield r
    r.close()


def redis_sidecar(port):
    if sidecar_bin() is None:
        pytest.skip(NOT_BUILT)
    return SidecarProcess(capacity_bytes=L1_BYTES, extent_bytes=1 << 20,
                          extra_args=[f"--Sidecar:Redis:Configuration=127.0.0.1:{port}",
                                      "--Sidecar:Redis:OperationTimeout=00:00:00.500",
                                      "--Sidecar:Redis:BreakerOpenDuration=00:00:01"])


def test_a_second_machine_reuses_the_first_machines_kv_through_redis(engines, redis):
    first, second = redis_sidecar(redis.port), redis_sidecar(redis.port)
    try:
        a = prompt(300, 4)
        run(engines(first.socket_path), "a", a)
        wait_for(lambda: stats(first.socket_path)["tiers"][0]["writes"] >= 4, "A in Redis")
        r = run(engines(second.socket_path), "a-elsewhere", a)
        assert r.num_external_computed_tokens == 256
        pool = stats(second.socket_path)["tiers"][0]
        assert pool["name"] == "redis" and pool["promotions"] == 4 and pool["corrupt"] == 0
    finally:
        first.stop()
        second.stop()


def test_redis_killed_and_restarted_is_a_miss_then_a_pool_again(engines, redis):
    s = redis_sidecar(redis.port)
    try:
        e = engines(s.socket_path)
        redis.stop()
        run(e, "while-down", prompt(300, 5))  # stores and lookups while Redis is gone: misses, no error to the engine
        down = stats(s.socket_path)["tiers"][0]
        assert down["errors"] > 0 and down["writes"] == 0
        redis.start()
        # Once the client reconnected and the circuit closed, new stores reach the pool again.
        attempt = iter(range(1000))
        a = []

        def stored_again():
            a[:] = prompt(300, 100 + next(attempt))
            run(e, f"after-{len(a)}-{a[0]}", a)
            time.sleep(0.2)
            return stats(s.socket_path)["tiers"][0]["writes"] >= 4

        wait_for(stored_again, "writes to the restarted Redis", seconds=30)
        other = redis_sidecar(redis.port)
        try:
            r = run(engines(other.socket_path), "a-elsewhere", a)
            assert r.num_external_computed_tokens == 256
        finally:
            other.stop()
    finally:
        s.stop()
