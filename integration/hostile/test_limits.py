"""Attacks on the bounds, one test each: chunk geometry, request fields, salts, leases per connection, frame
sizes and configured limits; last, the daemon's own memory after every attack. How a test judges an
attack: conftest.py."""

import os
import random
import time

import pytest

from agents import register_own, require
from daemon import Checks, Sidecar, TIGHT_MAX_CHUNK_BYTES, TIGHT_MAX_LEASES, check_serving, counters_moved, stat_check
from fake_engine.sidecar import SidecarStartError
from pool import GEOMETRY as G, Geometry, HostBuffer, bb, own_memory, tb
from wire import E, MiB, Op, code_name, header, p, unique


# ---------------------------------------------------------------------------------------------- 6. geometry bounds

# name -> (geometry, chunks a vulnerable sidecar is then asked to STORE)
GEOMETRIES = {
    "chunk_tokens_over_max": (Geometry(num_layers=1, num_blocks=2, block_tokens=16384, chunk_tokens=16384,
                                         num_heads=1, row_bytes=1, element_size=1), 1),
    "blocks_per_chunk_over_max": (Geometry(num_layers=1, num_blocks=16, block_tokens=1, chunk_tokens=2048,
                                             num_heads=1, row_bytes=8), 1),
    "chunk_bytes_over_quarter_capacity": (Geometry(num_layers=1, num_blocks=2, block_tokens=16, chunk_tokens=1024,
                                                     num_heads=16, row_bytes=1024), 3),
    "far_above_every_bound": (Geometry(num_layers=2, num_blocks=2, block_tokens=16, chunk_tokens=1 << 20,
                                         num_heads=4, row_bytes=64), 1),
    "chunk_bytes_below_min": (Geometry(num_layers=1, num_blocks=16, block_tokens=16, chunk_tokens=16,
                                         num_heads=1, row_bytes=8), 1),
}


@pytest.mark.parametrize("case", list(GEOMETRIES))
def test_register_with_out_of_bounds_chunk_geometry_is_refused(hostile_sidecar, victim, case):
    """REGISTER of the attacker's own, real memory with a chunk geometry outside the bounds (MaxChunkTokens 8192,
    MaxBlocksPerChunk 1024, MaxChunkBytes 256 MiB and CapacityBytes/4, MinChunkBytes 4096): LIMIT_EXCEEDED, and
    nothing is evicted. A sidecar that accepts it is then asked to STORE such chunks, which evicts the victim."""
    geometry, chunks = GEOMETRIES[case]
    s, checks = hostile_sidecar, Checks(case)
    mine = HostBuffer(geometry.total_bytes, "giant")
    before = s.stats()
    with s.client(unique("giant"), "worker") as attacker:
        reg = attacker.call(Op.REGISTER, geometry.register_fields(os.getpid(), mine.address))
        checks.code(reg, E.LIMIT_EXCEEDED, f"REGISTER of {geometry.chunk_bytes} bytes / {geometry.chunk_tokens} "
                                           f"tokens / {geometry.blocks_per_chunk} blocks per chunk")
        if reg.ok:
            blocks = [i % geometry.num_blocks for i in range(chunks * geometry.blocks_per_chunk)]
            tokens = [random.randrange(1000, 150000)] + [7] * (chunks * geometry.chunk_tokens - 1)
            attacker.call(Op.STORE, p.store("giant", None, tb(tokens), 0, chunks, bb(blocks)), timeout=30)
    after = s.stats()
    stat_check(checks, before, after, "chunks")
    stat_check(checks, before, after, "evictions", why="the giant chunks evicted others")
    victim.check_intact(checks)
    counters_moved(checks, before, after, ["limits_exceeded"])
    check_serving(checks, s)
    checks.verify()


@pytest.mark.parametrize("chunk_tokens,refused", [(256, True), (128, False)], ids=["2MiB-chunk", "1MiB-chunk"])
def test_configured_max_chunk_bytes_is_enforced(tight_sidecar, chunk_tokens, refused):
    """Bounds are settable on the command line: this sidecar runs with --Sidecar:MaxChunkBytes=1048576, so a
    2 MiB chunk (far inside every default bound) is refused and a chunk of exactly 1 MiB is served."""
    s, checks = tight_sidecar, Checks(f"{chunk_tokens} tokens")
    geometry = Geometry(num_layers=1, num_blocks=2, block_tokens=16, chunk_tokens=chunk_tokens, num_heads=8,
                          row_bytes=512)
    assert geometry.chunk_bytes == (2 if refused else 1) * TIGHT_MAX_CHUNK_BYTES
    mine = HostBuffer(geometry.total_bytes, "configured")
    before = s.stats()
    with s.client(unique("configured"), "worker") as conn:
        reg = conn.call(Op.REGISTER, geometry.register_fields(os.getpid(), mine.address))
    if refused:
        checks.code(reg, E.LIMIT_EXCEEDED, f"REGISTER of a {geometry.chunk_bytes}-byte chunk")
        counters_moved(checks, before, s.stats(), ["limits_exceeded"])
    else:
        checks.check(reg.ok and reg.get(2) == geometry.chunk_bytes,
                     f"REGISTER of a chunk of exactly MaxChunkBytes: {code_name(reg.code)} {reg.describe()}")
    check_serving(checks, s)
    checks.verify()


# ---------------------------------------------------------------------------------------------- 6. request bounds

def text_of(nbytes, char="r"):
    """A distinct string of exactly ``nbytes`` UTF-8 bytes (``char`` may be a 2-byte character)."""
    head = unique("x")[-10:]
    width = len(char.encode())
    return head + char * ((nbytes - len(head)) // width) + "z" * ((nbytes - len(head)) % width)


def _hello(s, conn, n):
    with s.connect() as fresh:
        return fresh.hello(text_of(n, "i"), "worker")


def _register(s, conn, n):
    mine = own_memory("bounds")
    with s.client(unique("bounds"), "worker") as fresh:
        return fresh.call(Op.REGISTER, G.register_fields(os.getpid(), mine.address, model_id=text_of(n, "m")))


def _tokens(n):
    return tb(G.tokens("many", 1) + [7] * (n - G.chunk_tokens))


BOUND_CASES = {
    # name: (bound, attempt(sidecar, registered connection, size) -> Reply)
    "hello_instance_id": (256, _hello),
    "register_model_id": (256, _register),
    "lookup_request_id": (256, lambda s, c, n: c.call(Op.LOOKUP, p.lookup(text_of(n), None, tb(range(64)), True))),
    "lookup_request_id_utf8": (256, lambda s, c, n: c.call(Op.LOOKUP, p.lookup(text_of(n, "é"), None, tb(range(64)), True))),
    "store_request_id": (256, lambda s, c, n: c.call(Op.STORE, p.store(text_of(n), None, tb(G.tokens(n, 1)), 0, 1,
                                                                       bb(G.blocks(0, 1))))),
    "load_request_id": (256, lambda s, c, n: c.call(Op.LOAD, p.load(text_of(n), None, tb(G.tokens(n, 1)), 0, 1,
                                                                    bb(G.blocks(2, 1))))),
    "lookup_tokens": (1 << 20, lambda s, c, n: c.call(Op.LOOKUP, p.lookup("many", None, _tokens(n), True), timeout=15)),
    "store_tokens": (1 << 20, lambda s, c, n: c.call(Op.STORE, p.store("many", None, _tokens(n), 0, 1,
                                                                       bb(G.blocks(0, 1))), timeout=15)),
    "load_tokens": (1 << 20, lambda s, c, n: c.call(Op.LOAD, p.load("many", None, _tokens(n), 0, 1,
                                                                    bb(G.blocks(2, 1))), timeout=15)),
}


@pytest.mark.parametrize("case", list(BOUND_CASES))
def test_request_fields_over_their_bound_are_refused(hostile_sidecar, case):
    """MaxIdBytes (instance, request and model ids, in UTF-8 bytes) and MaxTokensPerRequest: one over the bound
    gets LIMIT_EXCEEDED, exactly at the bound is served."""
    bound, attempt = BOUND_CASES[case]
    s, checks = hostile_sidecar, Checks(case)
    mine = own_memory("bounds-worker")
    before = s.stats()
    with s.client(unique("bounds"), "worker") as conn:
        register_own(conn, mine)
        over = attempt(s, conn, bound + 1)
        checks.code(over, E.LIMIT_EXCEEDED, f"{case} of {bound + 1}")
        at = attempt(s, conn, bound)
        checks.check(at.ok, f"{case} of exactly {bound} (the bound) was refused: {code_name(at.code)} {at.describe()}")
    counters_moved(checks, before, s.stats(), ["limits_exceeded"])
    check_serving(checks, s)
    checks.verify()


# ---------------------------------------------------------------------------------------------- salts

def test_salt_flood_is_bounded(hostile_sidecar, victim):
    """Thousands of leased lookups under distinct salts (and request ids) must not grow the daemon (no lease
    records for misses, no unbounded per-salt state); salts over MaxSaltBytes (256 UTF-8 bytes) are refused."""
    s, checks = hostile_sidecar, Checks()
    flood = int(os.environ.get("KVSIDECAR_SALT_FLOOD", "5000"))
    rng = random.Random(1234)
    mine = own_memory("salt-flood")
    tokens = tb(G.tokens("salt-flood", 4))
    instance = unique("salter")
    with s.client(instance, "worker") as worker, s.client(instance, "scheduler") as scheduler:
        register_own(worker, mine)
        warm = scheduler.call_many([(Op.LOOKUP, p.lookup(f"warm-{i}", f"warm-{i}", tokens, True)) for i in range(300)])
        require(warm[-1], "warm-up lookups")
        before, rss_before = s.stats(), s.rss_bytes()
        t0 = time.monotonic()

        def salt(i):
            return f"{i:06d}-" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(0, 249)))

        replies = scheduler.call_many(((Op.LOOKUP, p.lookup(f"flood-{i:06d}-{'q' * 90}", salt(i), tokens, True))
                                       for i in range(flood)), window=128, timeout=20)
        bad = [r for r in replies if not (r.ok and r.get(1) == 0 and r.get(2) == 0)]
        checks.check(not bad, f"{len(bad)} of {flood} flood lookups were not clean misses; first: "
                              f"{code_name(bad[0]) if bad else ''} {bad[0].describe() if bad else ''}")
        checks.check(time.monotonic() - t0 < 30, f"{flood} lookups took {time.monotonic() - t0:.1f} s")

        over = {"257 ASCII bytes": "s" * 257, "129 two-byte characters (258 bytes)": "é" * 129, "1 MiB": "x" * MiB}
        for what, bad_salt in over.items():
            checks.code(scheduler.call(Op.LOOKUP, p.lookup("long-salt", bad_salt, tokens, True)), E.LIMIT_EXCEEDED,
                        f"LOOKUP with a salt of {what}")
            checks.code(worker.call(Op.STORE, p.store("long-salt", bad_salt, tokens, 0, 1, bb(G.blocks(0, 1)))),
                        E.LIMIT_EXCEEDED, f"STORE with a salt of {what}")
            checks.code(worker.call(Op.LOAD, p.load("long-salt", bad_salt, tokens, 0, 1, bb(G.blocks(2, 1)))),
                        E.LIMIT_EXCEEDED, f"LOAD with a salt of {what}")
        at_bound = scheduler.call(Op.LOOKUP, p.lookup("salt-256", "é" * 128, tokens, False))
        checks.check(at_bound.ok, f"LOOKUP with a salt of exactly 256 UTF-8 bytes was refused: {at_bound.describe()}")
        after, rss_after = s.stats(), s.rss_bytes()
    growth = rss_after - rss_before
    checks.check(growth < 64 * MiB, f"the daemon's RSS grew by {growth / MiB:.1f} MiB during the salt flood (bound 64 MiB)")
    stat_check(checks, before, after, "active_leases", why="missed lookups created leases")
    counters_moved(checks, before, after, ["limits_exceeded"], by=9)
    victim.check_intact(checks)
    check_serving(checks, s)
    checks.verify()


# ---------------------------------------------------------------------------------------------- 4. leases

def test_leases_per_connection_are_bounded(tight_sidecar):
    """MaxLeasesPerConnection (8 on this sidecar): the leased lookups past it are refused with LIMIT_EXCEEDED,
    a released lease frees a slot, and another connection has slots of its own."""
    s, checks, limit = tight_sidecar, Checks(), TIGHT_MAX_LEASES
    mine = own_memory("leaser")
    tokens = tb(G.tokens("leaser", 1))
    instance = unique("leaser")
    with s.client(instance, "worker") as worker, s.client(instance, "scheduler") as greedy, \
            s.client(instance, "scheduler") as other:
        register_own(worker, mine)
        require(worker.call(Op.STORE, p.store("seed", None, tokens, 0, 1, bb(G.blocks(0, 1)))), "STORE of one chunk")
        before = s.stats()
        replies = [greedy.call(Op.LOOKUP, p.lookup(f"req-{i}", None, tokens, True)) for i in range(limit + 12)]
        leased = [r.get(2) for r in replies if r.ok and r.get(2)]
        over = [r for r in replies[limit:] if r.code == E.LIMIT_EXCEEDED]
        checks.check(len(leased) == limit, f"{len(leased)} of {len(replies)} leased lookups on one connection got a lease")
        checks.check(len(over) == 12, f"{len(over)} of the 12 lookups past the bound got LIMIT_EXCEEDED")
        mid = s.stats()
        stat_check(checks, before, mid, "active_leases", "<=", limit)
        counters_moved(checks, before, mid, ["limits_exceeded"], by=12)
        if leased:
            require(greedy.call(Op.RELEASE, p.release(leased[0], None)), "RELEASE of one of its own leases")
            again = greedy.call(Op.LOOKUP, p.lookup("req-again", None, tokens, True))
            checks.check(again.ok and again.get(2), f"after a RELEASE the connection could not lease: {again.describe()}")
        elsewhere = other.call(Op.LOOKUP, p.lookup("req-other", None, tokens, True))
        checks.check(elsewhere.ok and elsewhere.get(2), f"another connection could not lease: {elsewhere.describe()}")
    check_serving(checks, s)
    checks.verify()


# ---------------------------------------------------------------------------------------------- 6. frames

@pytest.mark.parametrize("hello_first", [True, False], ids=["after-hello", "before-hello"])
@pytest.mark.parametrize("body_length", [0x7FFFFFFF, 0x80000000, 0xFFFFFFFF], ids=["2GiB-1", "2GiB", "4GiB-1"])
def test_frame_header_announcing_a_huge_body_is_refused_without_buffering(hostile_sidecar, victim, body_length,
                                                                           hello_first):
    s, checks = hostile_sidecar, Checks(f"body_length {body_length:#x}")
    before, peak_before = s.stats(), s.peak_rss_bytes()
    with s.connect() as c:
        if hello_first:
            require(c.hello(unique("huge")), "HELLO")
        c.send_raw(header(Op.STORE, 4242, body_length))
        c.send_raw(b"\xab" * MiB, timeout=2)  # the start of the body; the sidecar may already have hung up
        reply = c.recv_reply(4242, timeout=5)
        checks.code(reply, E.FRAME_TOO_LARGE, "the huge frame")
        checks.check(c.wait_closed(5), "the connection is still open after FRAME_TOO_LARGE")
    growth = s.peak_rss_bytes() - peak_before
    checks.check(growth < 64 * MiB, f"the daemon's peak RSS grew by {growth / MiB:.0f} MiB (the body was buffered?)")
    counters_moved(checks, before, s.stats(), ["protocol_errors"])
    victim.check_intact(checks)
    check_serving(checks, s)
    checks.verify()


# ---------------------------------------------------------------------------------------------- 6. configuration

@pytest.mark.parametrize("value,starts", [(1 << 30, True), ((1 << 30) + 1, False), ((1 << 31) - 1, False)],
                         ids=["1GiB", "1GiB+1", "2GiB-1"])
def test_max_frame_bytes_above_1gib_is_refused_at_startup(sidecar_built, value, starts):
    checks = Checks(f"MaxFrameBytes={value}")
    try:
        s = Sidecar(f"MaxFrameBytes={value}", name="frame-limit")
    except SidecarStartError as e:
        checks.check(not starts, f"the sidecar refused MaxFrameBytes={value}:\n{e.log[-1500:]}")
        checks.check(e.returncode not in (None, 0), f"refused configuration exited with {e.returncode}")
    else:
        try:
            checks.check(starts, f"the sidecar started with MaxFrameBytes={value} (above 1 GiB)")
            if starts:
                with s.connect() as c:
                    hello = c.hello(unique("frame-limit"))
                checks.check(hello.get(3) == value, f"HELLO announces max_frame_bytes {hello.get(3)}")
        finally:
            s.stop()
    checks.verify()


# ---------------------------------------------------------------------------------------------- last: the daemon's size

@pytest.mark.after_attacks
def test_daemon_memory_stays_bounded_after_all_attacks(hostile_sidecar):
    """Runs after every other test (the after_attacks mark, conftest.py): after every attack on this shared
    sidecar, the daemon's resident memory (now and at its peak) stays within CapacityBytes (64 MiB) plus a
    192 MiB margin for the .NET runtime (about 65 MiB idle)."""
    s, checks = hostile_sidecar, Checks()
    limit = s.capacity_bytes + 192 * MiB
    checks.check(s.alive(), f"the sidecar is dead:\n{s.log()}")
    checks.check(s.rss_bytes() <= limit, f"VmRSS {s.rss_bytes() / MiB:.0f} MiB > {limit / MiB:.0f} MiB")
    checks.check(s.peak_rss_bytes() <= limit, f"VmHWM {s.peak_rss_bytes() / MiB:.0f} MiB > {limit / MiB:.0f} MiB")
    check_serving(checks, s)
    checks.verify()
