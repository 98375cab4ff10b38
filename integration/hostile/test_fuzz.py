"""Seeded protocol fuzzing of a live sidecar (fuzzer.py): KVSIDECAR_FUZZ_FRAMES frames (default 3000) from
KVSIDECAR_FUZZ_SEED (default fixed, so CI is reproducible) over several connections of a fuzz client process.
After every batch: the client saw only well-formed replies and no hung connection, the sidecar is alive, and
a well-behaved client (one kept open since the start, and a fresh one) gets PING and LOOKUP answered."""

import math
import multiprocessing as mp
import os
import time

import pytest

import fuzzer
from daemon import Sidecar
from pool import GEOMETRY as G, HostBuffer, bb, tb
from wire import MiB, Op, code_name, p, unique

DEFAULT_SEED = 20240611
BATCH = 150
BATCH_TIMEOUT = 45.0
SERVE_BOUND = 3.0


@pytest.fixture(scope="module")
def fuzz_sidecar(sidecar_built):
    s = Sidecar("SendTimeout=00:00:05", name="fuzz")
    yield s
    s.stop()


def test_fuzzed_frames_never_hurt_the_daemon(fuzz_sidecar):
    s = fuzz_sidecar
    seed = int(os.environ.get("KVSIDECAR_FUZZ_SEED", DEFAULT_SEED))
    frames = int(os.environ.get("KVSIDECAR_FUZZ_FRAMES", 3000))
    repro = f"reproduce with KVSIDECAR_FUZZ_SEED={seed} KVSIDECAR_FUZZ_FRAMES={frames}"
    print(f"fuzzing {frames} frames, seed {seed} ({repro})")

    memory = HostBuffer(G.total_bytes, "fuzz-health")  # only ever read (STORE), never written
    health = s.client(unique("fuzz-health"), "worker")
    health_tokens = G.tokens("fuzz-health", 2)
    assert health.call(Op.REGISTER, G.register_fields(os.getpid(), memory.address)).ok, "the health client's REGISTER"
    assert health.call(Op.STORE, p.store("h", "health", tb(health_tokens), 0, 2, bb(G.blocks(0, 2)))).get(0) == 2

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=fuzzer.child_main, args=(child, s.socket_path, seed), daemon=True, name="fuzz-client")
    proc.start()
    started = time.monotonic()
    try:
        batches = math.ceil(frames / BATCH)
        for b in range(batches):
            n = min(BATCH, frames - b * BATCH)
            where = f"batch {b + 1}/{batches} ({b * BATCH}..{b * BATCH + n} frames); {repro}"
            parent.send(("batch", n))
            assert parent.poll(BATCH_TIMEOUT), \
                f"the fuzz client did not finish {where} within {BATCH_TIMEOUT:.0f} s (a hung read?)\n{s.log(20)}"
            try:
                status, report = parent.recv()
            except EOFError:
                raise AssertionError(f"the fuzz client process died (exit code {proc.exitcode}: a stray write into "
                                     f"its memory?) in {where}") from None
            assert status == "ok", f"the fuzz client failed in {where}:\n{report}"
            assert not report["violations"], f"{where}:\n  " + "\n  ".join(report["violations"][:20])
            assert s.alive(), f"the sidecar died in {where}:\n{s.log()}"

            t0 = time.monotonic()
            ping = health.call(Op.PING, [b], timeout=SERVE_BOUND)
            look = health.call(Op.LOOKUP, p.lookup("h", "health", tb(health_tokens), False), timeout=SERVE_BOUND)
            assert ping.ok and ping.fields == [b], f"the long-lived client's PING: {code_name(ping.code)} in {where}"
            assert look.ok, f"the long-lived client's LOOKUP: {code_name(look.code)} {look.describe()} in {where}"
            ok, detail = s.serve_check(timeout=SERVE_BOUND)
            assert ok, f"a fresh client after {where}: {detail}"
            assert time.monotonic() - t0 < 2 * SERVE_BOUND, f"health checks took {time.monotonic() - t0:.1f} s"

        parent.send(("stop", None))
        assert parent.poll(10), f"the fuzz client did not stop; {repro}"
        status, summary = parent.recv()
        assert status == "ok" and summary["sent"] == frames, f"{summary}; {repro}"
        print(f"fuzzed {summary['sent']} frames in {time.monotonic() - started:.1f} s: {summary['totals']}")
    finally:
        health.close()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    peak = s.peak_rss_bytes()
    assert peak < 1024 * MiB, f"the sidecar's peak RSS reached {peak / MiB:.0f} MiB; {repro}"
