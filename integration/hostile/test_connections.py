"""Attacks on connections and deadlines, one test each: clients that never read, never say HELLO or die
mid-transfer, and requests past their deadline. How a test judges an attack: conftest.py."""

import os
import time

from agents import Agent, Victim, register_own, require
from daemon import Checks, TIGHT_MAX_CONNECTIONS, check_serving, counters_moved, stat_check, wait_until
from pool import GEOMETRY as G, bb, own_memory, tb
from wire import Op, code_name, p, unique

SALT = Victim.SALT
SECOND = 1_000_000_000


# ---------------------------------------------------------------------------------------------- 8. connections

def test_client_that_never_reads_is_dropped_without_delaying_others(hostile_sidecar, victim):
    """A client pipelines thousands of STOREs, PINGs and STATS and never reads a reply. Others' requests (inline
    and copies) are still answered within 3 s, and the deaf client is dropped after SendTimeout (2 s here)."""
    s, checks = hostile_sidecar, Checks()
    before = s.stats()
    mine = own_memory("deaf")
    deaf = s.client(unique("deaf"), "worker")
    try:
        register_own(deaf, mine)
        store = p.store("deaf", None, tb(G.tokens("deaf", 1)), 0, 1, bb(G.blocks(0, 1)))
        frames = [(Op.STORE, store), (Op.PING, [7]), (Op.STATS, None)]
        data = b"".join(p.encode_frame(op, 10_000 + i, fields) for i in range(256) for op, fields in frames)
        sent, t0 = 0, time.monotonic()
        while sent < 40_000 and time.monotonic() - t0 < 5:
            if not deaf.send_raw(data, timeout=1.0):
                break
            sent += 3 * 256
        checks.check(sent >= 3 * 256, f"only {sent} frames went out")

        t0 = time.monotonic()
        ok, detail = s.serve_check(timeout=3)
        checks.check(ok, f"while a client does not read, a fresh client: {detail}")
        look = victim.lookup(timeout=3)
        checks.check(look.ok and look.get(1) == victim.chunks, f"the victim's LOOKUP: {code_name(look.code)} {look.describe()}")
        skip_all = [-1] * (victim.chunks * G.blocks_per_chunk)
        load = victim.worker(Op.LOAD, p.load("noop", SALT, tb(victim.tokens), 0, victim.chunks, bb(skip_all)), timeout=3)
        checks.check(load.ok, f"the victim's LOAD (copy path): {code_name(load.code)} {load.describe()}")
        more = victim.worker(Op.STORE, p.store("more", SALT, tb(victim.all_tokens), victim.chunks, 1,
                                               bb(G.blocks(8, 1))), timeout=3)
        checks.check(more.ok, f"the victim's STORE (copy path): {code_name(more.code)} {more.describe()}")
        checks.check(time.monotonic() - t0 < 8, f"the others' requests took {time.monotonic() - t0:.1f} s")

        dropped, last = s.wait_stat("dropped_connections", lambda v: v > (before["dropped_connections"] or 0), 10)
        checks.check(dropped, f"dropped_connections is {last} 10 s later (SendTimeout is 2 s)")
        checks.check(deaf.wait_closed(5 if dropped else 1), "the deaf client's connection is still open")
    finally:
        deaf.close()
    victim.check_intact(checks)
    check_serving(checks, s)
    checks.verify()


def test_connections_without_hello_are_closed_after_hello_timeout(tight_sidecar):
    """MaxConnections=16, HelloTimeout=1 s: 15 connections that never finish a HELLO (silent, half a header,
    half a HELLO body) plus one idle connection that did say HELLO fill the daemon; within a few seconds the
    silent ones are closed and a new client is served, and the one that said HELLO is kept."""
    s, checks = tight_sidecar, Checks()
    keeper = s.client(unique("keeper"), "scheduler")
    idle = []
    try:
        hello_frame = p.encode_frame(Op.HELLO, 1, p.hello("slow", "worker", 0, os.getpid()))
        for i in range(TIGHT_MAX_CONNECTIONS - 1):  # the keeper holds the last slot
            c = s.connect()
            if i % 3 == 1:
                c.send_raw(hello_frame[:10])
            elif i % 3 == 2:
                c.send_raw(hello_frame[:-5])
            idle.append(c)
        t0 = time.monotonic()
        served = wait_until(lambda: s.serve_check(timeout=1)[0], timeout=6, interval=0.2)
        checks.check(served, f"no new client was served within 6 s of opening {len(idle)} idle connections")
        open_ = [c for c in idle if not c.wait_closed(max(0.1, t0 + 6 - time.monotonic()))]
        checks.check(not open_, f"{len(open_)} of {len(idle)} connections without HELLO are still open after 6 s")
        ping = keeper.call(Op.PING, [1], timeout=3)
        checks.check(ping.ok, f"an idle connection that did say HELLO was closed: {code_name(ping.code)}")
        fell, last = s.wait_stat("connections", lambda v: v <= 2, timeout=3)
        checks.check(fell, f"STATS connections is {last}, expected 2 (the keeper and STATS' own)")
    finally:
        keeper.close()
        for c in idle:
            c.close()
    check_serving(checks, s)
    checks.verify()


def test_engine_killed_mid_transfer_leaves_the_daemon_serving(hostile_sidecar, victim):
    """An engine is SIGKILLed with STOREs and LOADs in flight: the daemon lives, serves others, and drops the
    dead engine's registration and connection."""
    s, checks = hostile_sidecar, Checks()
    before = s.stats()
    doomed = Agent(name="doomed engine")
    try:
        instance = unique("doomed")
        address = doomed.alloc(G.total_bytes, "doomed")
        doomed.connect("worker", s.socket_path)
        doomed.grant_ptrace(require(doomed.hello("worker", instance), "HELLO").get(5))
        require(doomed.call("worker", Op.REGISTER, G.register_fields(doomed.pid, address)), "REGISTER")
        base = G.tokens("doomed", 4)
        require(doomed.call("worker", Op.STORE, p.store("base", None, tb(base), 0, 4, bb(G.blocks(0, 4)))), "STORE")
        stat_check(checks, before, s.stats(), "registrations", "==", 1, "the doomed engine's registration")
        frames = []
        for i in range(150):
            frames.append((Op.STORE, p.store(f"s{i}", None, tb(G.tokens(f"doomed-{i}", 2)), 0, 2, bb(G.blocks(0, 2)))))
            frames.append((Op.LOAD, p.load(f"l{i}", None, tb(base), 0, 4, bb(G.blocks(8, 4)))))
        sent = doomed.send_frames("worker", frames, timeout=2)
        checks.check(sent > 0, "no request went out before the kill")
    finally:
        doomed.kill()  # SIGKILL, with the requests in flight
    checks.check(s.alive(), f"the sidecar died with the engine:\n{s.log()}")
    for name in ("registrations", "connections"):
        fell, last = s.wait_stat(name, lambda v: v <= (before[name] or 0), timeout=15)
        checks.check(fell, f"STATS {name} is {last} 15 s after the kill, expected {before[name]}")
    victim.check_intact(checks)
    more = victim.worker(Op.STORE, p.store("after-kill", SALT, tb(victim.all_tokens), victim.chunks, 1, bb(G.blocks(8, 1))))
    checks.check(more.ok and more.get(0) == 1, f"the victim's STORE after the kill: {code_name(more.code)} {more.describe()}")
    check_serving(checks, s)
    checks.verify()


# ---------------------------------------------------------------------------------------------- 7. deadlines

def test_load_past_its_deadline_writes_nothing(hostile_sidecar, victim):
    s, checks = hostile_sidecar, Checks()
    before = s.stats()
    target = G.blocks(8, 2)
    late = victim.worker(Op.LOAD, p.load("late", SALT, tb(victim.tokens), 0, 2, bb(target),
                                         deadline_ns=time.monotonic_ns() - SECOND))
    checks.check(late.ok and late.get(0) == 0, f"a LOAD 1 s past its deadline: {code_name(late.code)} {late.describe()}")
    checks.check(victim.memory_unchanged(), "a LOAD past its deadline wrote into the engine's blocks")
    counters_moved(checks, before, s.stats(), ["late_loads"])
    victim.check_intact(checks)
    # Control: the same LOAD with time to spare loads both chunks, byte for byte.
    in_time = victim.worker(Op.LOAD, p.load("in-time", SALT, tb(victim.tokens), 0, 2, bb(target),
                                            deadline_ns=time.monotonic_ns() + 30 * SECOND))
    checks.check(in_time.get(0) == 2, f"the same LOAD before its deadline: {code_name(in_time.code)} {in_time.describe()}")
    source = [victim.agent.read(o, n) for o, n in G.block_extents(G.blocks(0, 2))]
    loaded = [victim.agent.read(o, n) for o, n in G.block_extents(target)]
    checks.check(source == loaded, "the in-time LOAD did not bring the stored bytes")
    check_serving(checks, s)
    checks.verify()


def test_store_past_its_deadline_commits_nothing(hostile_sidecar, victim):
    s, checks = hostile_sidecar, Checks()
    before = s.stats()
    n = victim.chunks
    late = victim.worker(Op.STORE, p.store("late", SALT, tb(victim.all_tokens), n, 2, bb(G.blocks(8, 2)),
                                           deadline_ns=time.monotonic_ns() - SECOND))
    checks.check(late.ok and late.get(0) == 0 and late.get(2) == 2,
                 f"a STORE 1 s past its deadline: {code_name(late.code)} {late.describe()} (expected stored 0, failed 2)")
    hits = victim.lookup(tokens=victim.all_tokens).get(1)
    checks.check(hits == n, f"after a late STORE the victim's extended prompt hits {hits} chunks, expected {n}")
    after = s.stats()
    stat_check(checks, before, after, "chunks", why="a late STORE committed chunks")
    counters_moved(checks, before, after, ["late_stores"])
    in_time = victim.worker(Op.STORE, p.store("in-time", SALT, tb(victim.all_tokens), n, 2, bb(G.blocks(8, 2)),
                                              deadline_ns=time.monotonic_ns() + 30 * SECOND))
    checks.check(in_time.get(0) == 2, f"the same STORE before its deadline: {code_name(in_time.code)} {in_time.describe()}")
    checks.check(victim.lookup(tokens=victim.all_tokens).get(1) == n + 2, "the in-time STORE's chunks are not found")
    victim.check_intact(checks)
    check_serving(checks, s)
    checks.verify()
