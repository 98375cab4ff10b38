"""Attacks on who may touch what, one test each: peer identity (the memory a client names must be its own),
server-side keys and salts, instance ownership, leases and administration. How a test judges an attack:
conftest.py."""

import os

import pytest

from agents import Victim, register_own, require
from daemon import Checks, check_serving, counters_moved, stat_check
from pool import GEOMETRY as G, Geometry, bb, leaked, own_memory, tb
from wire import E, Op, code_name, p, unique

SALT = Victim.SALT


def rw_mapping(pid, min_bytes):
    """The address of a private read-write mapping of ``pid`` of at least ``min_bytes`` (a plausible address
    if its maps cannot be read: the refusal must not depend on the address)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split()
                start, end = (int(x, 16) for x in parts[0].split("-"))
                path = parts[5] if len(parts) > 5 else ""
                if parts[1] == "rw-p" and end - start >= min_bytes and path in ("", "[heap]"):
                    return start
    except OSError:
        pass
    return 0x7F00_0000_0000


# ---------------------------------------------------------------------------------------------- 1. peer identity

@pytest.mark.parametrize("spoofed", ["all_layers", "second_layer_only"])
def test_register_naming_another_process_memory_is_refused(hostile_sidecar, victim, spoofed):
    """An attacker registers the victim's pid and addresses, then tries to copy the victim's KV out (STORE from
    the spoofed registration, LOAD into its own memory) and to overwrite it (LOAD into the spoofed registration)."""
    s, checks = hostile_sidecar, Checks(f"spoofed {spoofed}")
    before = s.stats()
    mine = own_memory("spoof-attacker")
    refs = [(victim.agent.pid, victim.address + i * G.layer_bytes) for i in range(G.num_layers)]
    if spoofed == "second_layer_only":
        refs[0] = (os.getpid(), mine.address)
    instance = unique("spoofer")
    with s.client(instance, "worker") as thief, s.client(instance, "worker") as fence:
        reg = thief.call(Op.REGISTER, G.register_fields(0, 0, layer_refs=refs))
        checks.code(reg, E.PERMISSION_DENIED, "REGISTER naming the victim's pid and memory")

        loot = G.tokens(unique("loot"), 2)
        steal = thief.call(Op.STORE, p.store("steal", "thief", tb(loot), 0, 2, bb(G.blocks(0, 2))))
        register_own(fence, mine)
        fenced = fence.call(Op.LOAD, p.load("fence", "thief", tb(loot), 0, 2, bb(G.blocks(8, 2))))
        junk = G.tokens(unique("junk"), 2)
        require(fence.call(Op.STORE, p.store("junk", "thief", tb(junk), 0, 2, bb(G.blocks(12, 2)))), "STORE of junk")
        corrupt = thief.call(Op.LOAD, p.load("corrupt", "thief", tb(junk), 0, 2, bb(G.blocks(0, 2))))
        after = s.stats()

        checks.refused(steal, "STORE copying out of the victim's memory")
        checks.check(fenced.get(0, 0) == 0, f"the attacker LOADed {fenced.get(0)} chunks copied out of the victim's memory")
        checks.refused(corrupt, "LOAD writing into the victim's memory")
        checks.check(leaked(victim.secret, mine.read()) == 0, "the victim's secret reached the attacker's memory")
        stat_check(checks, before, after, "registrations", "<=", 1, "the spoofed registration was kept")
    victim.check_intact(checks)
    counters_moved(checks, before, after, ["permission_denied"])
    check_serving(checks, s)
    checks.verify()


def test_register_naming_the_sidecars_own_memory_is_refused(fresh_sidecar):
    """Registering the daemon's own heap would let a client copy other tenants' cached KV out of it."""
    s, checks = fresh_sidecar, Checks()
    before = s.stats()
    address = rw_mapping(s.pid, G.total_bytes)
    with s.client(unique("spy"), "worker") as spy:
        reg = spy.call(Op.REGISTER, G.register_fields(s.pid, address))
        checks.code(reg, E.PERMISSION_DENIED, "REGISTER naming the sidecar's pid and heap")
        steal = spy.call(Op.STORE, p.store("steal", None, tb(G.tokens(unique("heap"), 2)), 0, 2, bb(G.blocks(0, 2))))
        checks.refused(steal, "STORE copying out of the sidecar's heap")
    after = s.stats()
    stat_check(checks, before, after, "chunks", "==", 0, "the sidecar's heap was copied into the cache")
    counters_moved(checks, before, after, ["permission_denied"])
    check_serving(checks, s)
    checks.verify()


# ---------------------------------------------------------------------------------------------- 2. keys are the server's

def test_store_and_load_naming_chunks_by_key_are_refused(hostile_sidecar, victim):
    """The attacker computes the victim's chunk keys (docs/hashing.md) and LOADs them into its own memory, and
    STOREs its own bytes under the keys of the victim's next chunks (poisoning them) - both by the keys field."""
    from csharp_kv import keys as K

    s, checks = hostile_sidecar, Checks()
    before = s.stats()
    mine = own_memory("key-thief")
    baseline = mine.digest()
    with s.client(unique("key-thief"), "worker") as thief:
        fingerprint = register_own(thief, mine).get(1)
        root = K.root_key(K.encode_namespace(G.model_id, G.kv_dtype, fingerprint, G.block_tokens, G.chunk_tokens,
                                             G.tp_size, G.tp_rank, 0, 1, SALT))
        keys = K.chunk_keys(root, G.chunk_tokens, victim.all_tokens)
        n = victim.chunks

        by_key_load = p.load("k-load", None, None, 0, n, bb(G.blocks(0, n)))
        by_key_load[3] = b"".join(keys[:n])
        checks.code(thief.call(Op.LOAD, by_key_load), E.BAD_REQUEST, "LOAD of the victim's chunks by key")

        poison = p.store("k-poison", None, None, n, 2, bb(G.blocks(8, 2)))
        poison[3] = b"".join(keys[n:n + 2])
        checks.code(thief.call(Op.STORE, poison), E.BAD_REQUEST, "STORE of the attacker's bytes under the victim's keys")

        fresh = tb(G.tokens(unique("both"), 1))
        both = p.store("k-both", "thief", fresh, 0, 1, bb(G.blocks(8, 1)))
        both[3] = bytes(32)
        checks.code(thief.call(Op.STORE, both), E.BAD_REQUEST, "STORE with tokens and keys")
        both = p.load("k-both", "thief", fresh, 0, 1, bb(G.blocks(8, 1)))
        both[3] = bytes(32)
        checks.code(thief.call(Op.LOAD, both), E.BAD_REQUEST, "LOAD with tokens and keys")
        mid = s.stats()

    checks.check(mine.digest() == baseline, "a LOAD by key wrote into the attacker's memory")
    checks.check(leaked(victim.secret, mine.read()) == 0, "the victim's secret reached the attacker's memory")
    stat_check(checks, before, mid, "chunks", "==", 0, "STOREs by key added chunks")
    victim.check_intact(checks)
    # The victim now stores its next two chunks itself and loads them back: its own bytes, not the attacker's.
    stored = victim.worker(Op.STORE, p.store("victim-next", SALT, tb(victim.all_tokens), n, 2, bb(G.blocks(8, 2))))
    checks.check(stored.get(0) == 2, f"the victim's STORE of its next 2 chunks: {stored.describe()} "
                                     "(already present means the attacker's poisoned chunks took their place)")
    back = victim.worker(Op.LOAD, p.load("victim-next", SALT, tb(victim.all_tokens), n, 2, bb(G.blocks(12, 2))))
    checks.check(back.get(0) == 2, f"the victim's LOAD of its next 2 chunks: {back.describe()}")
    source = [victim.agent.read(o, k) for o, k in G.block_extents(G.blocks(8, 2))]
    loaded = [victim.agent.read(o, k) for o, k in G.block_extents(G.blocks(12, 2))]
    checks.check(source == loaded, "the victim's chunks came back with other bytes than it stored (poisoned)")
    counters_moved(checks, before, s.stats(), ["protocol_errors"], by=4)
    check_serving(checks, s)
    checks.verify()


@pytest.mark.parametrize("salt", [None, "", "attacker", "Victim", "victim\x00", "victim "],
                         ids=["no-salt", "empty", "other", "case", "nul-suffix", "space-suffix"])
def test_lookup_and_load_under_another_salt_find_nothing(hostile_sidecar, victim, salt):
    """A second tenant registers its own memory with the victim's exact namespace and layout and asks for the
    victim's tokens under its own salt: no hit, no lease, no byte of the victim's KV."""
    s, checks = hostile_sidecar, Checks(f"salt {salt!r}")
    before = s.stats()
    mine = own_memory("tenant-b")
    baseline = mine.digest()
    instance = unique("tenant-b")
    with s.client(instance, "worker") as worker, s.client(instance, "scheduler") as scheduler:
        register_own(worker, mine)
        look = scheduler.call(Op.LOOKUP, p.lookup("b-req", salt, tb(victim.tokens), True))
        checks.check(look.ok and look.get(1) == 0 and look.get(2) == 0,
                     f"LOOKUP of the victim's tokens under salt {salt!r}: {code_name(look.code)} {look.describe()}")
        load = worker.call(Op.LOAD, p.load("b-req", salt, tb(victim.tokens), 0, victim.chunks,
                                           bb(G.blocks(0, victim.chunks))))
        checks.check(load.ok and load.get(0) == 0, f"LOAD of the victim's tokens under salt {salt!r}: "
                                                   f"{code_name(load.code)} {load.describe()}")
        checks.check(mine.digest() == baseline, "the other tenant's memory was written")
        checks.check(leaked(victim.secret, mine.read()) == 0, "the victim's secret reached the other tenant")
        # Control: the namespaces match, so under the victim's own salt the same lookup hits: only the salt
        # separates the tenants, and the test above really asked for the victim's chunks.
        control = scheduler.call(Op.LOOKUP, p.lookup("b-ctl", SALT, tb(victim.tokens), False))
        checks.check(control.get(1) == victim.chunks, f"control LOOKUP under the victim's salt: {control.describe()}")
    victim.check_intact(checks)
    counters_moved(checks, before, s.stats(), ["misses"])
    check_serving(checks, s)
    checks.verify()


# ---------------------------------------------------------------------------------------------- 3. instance ownership

def test_instance_id_of_another_uid_cannot_be_taken(hostile_sidecar, victim, foreign_agent):
    """An attacker of another uid says HELLO with the victim's instance id. Accepted, it could release the victim's
    leases by request id, probe its cache under its salt, and register a fake rank that zeroes the victim's hits."""
    s, checks = hostile_sidecar, Checks()
    require(victim.lookup(lease=True, request_id="victim-leased"), "the victim's leased LOOKUP")
    before = s.stats()
    a = foreign_agent
    address = a.alloc(G.total_bytes, "thief")
    a.connect("c", s.socket_path)
    a.connect("w", s.socket_path)
    checks.code(a.hello("c", victim.instance, "scheduler"), E.PERMISSION_DENIED, "HELLO with the victim's instance id")
    a.hello("w", victim.instance, "worker", rank=1)
    fake_rank = Geometry(tp_size=2, tp_rank=1)
    checks.refused(a.call("w", Op.REGISTER, fake_rank.register_fields(a.pid, address)),
                   "REGISTER of a fake rank in the victim's instance")
    released = a.call("c", Op.RELEASE, p.release(0, "victim-leased"))
    checks.check(not (released.ok and released.get(0, 0) > 0), f"the attacker released the victim's lease: {released.describe()}")
    probe = a.call("c", Op.LOOKUP, p.lookup("probe", SALT, tb(victim.tokens), False))
    checks.check(not (probe.ok and probe.get(1, 0) > 0), f"the attacker's LOOKUP as the victim found {probe.get(1)} chunks")
    after = s.stats()
    stat_check(checks, before, after, "active_leases", why="the victim's lease was released")
    stat_check(checks, before, after, "registrations", "<=", 0, "the fake rank was registered")
    counters_moved(checks, before, after, ["permission_denied"])
    victim.check_intact(checks)
    # Control: another process of the victim's own uid may join its instance (scheduler and workers).
    with s.connect() as peer:
        joined = peer.hello(victim.instance, "worker", rank=0)
    checks.check(joined.ok, f"a same-uid HELLO with the victim's instance id was refused: {joined.describe()}")
    victim.scheduler(Op.RELEASE, p.release(0, "victim-leased"))
    check_serving(checks, s)
    checks.verify()


# ---------------------------------------------------------------------------------------------- 4. leases

def test_release_of_another_instances_lease_is_refused(hostile_sidecar, victim, foreign_agent):
    """An attacker of another uid and instance releases the victim's lease by id (and guesses its neighbours,
    and tries the victim's request id): UNKNOWN_LEASE, and the lease stays."""
    s, checks = hostile_sidecar, Checks()
    lease = require(victim.lookup(lease=True, request_id="victim-leased"), "the victim's leased LOOKUP").get(2)
    assert lease, "setup failed: the victim's LOOKUP leased nothing"
    before = s.stats()
    a = foreign_agent
    a.connect("c", s.socket_path)
    require(a.hello("c", unique("lease-thief"), "scheduler"), "the attacker's HELLO under its own instance")
    checks.code(a.call("c", Op.RELEASE, p.release(lease, None)), E.UNKNOWN_LEASE, "RELEASE of the victim's lease id")
    guesses = [(lease + d) % (1 << 64) for d in range(-64, 65) if d and (lease + d) % (1 << 64)]
    released = [g for g in guesses if a.call("c", Op.RELEASE, p.release(g, None)).ok]
    checks.check(not released, f"the attacker released {len(released)} leases by guessing ids near {lease}")
    by_request = a.call("c", Op.RELEASE, p.release(0, "victim-leased"))
    checks.check(not (by_request.ok and by_request.get(0, 0) > 0),
                 f"RELEASE of the victim's request id from another instance released {by_request.get(0)} chunks")
    after = s.stats()
    stat_check(checks, before, after, "active_leases", why="the victim's lease was released")
    # The lease was real: its owner can release it.
    own = victim.scheduler(Op.RELEASE, p.release(lease, None))
    checks.check(own.ok and own.get(0) == victim.chunks, f"the victim's own RELEASE: {code_name(own.code)} {own.describe()}")
    stat_check(checks, after, s.stats(), "active_leases", "<", 0, "the victim's own RELEASE released nothing")
    victim.check_intact(checks)
    check_serving(checks, s)
    checks.verify()


def test_lease_ids_are_unpredictable(hostile_sidecar, victim):
    """Lease ids are random 64-bit values, not a counter another client could walk."""
    checks = Checks()
    ids = [victim.lookup(lease=True, request_id=f"unpredictable-{i}").get(2, 0) for i in range(16)]
    checks.check(all(ids) and len(set(ids)) == len(ids), f"lease ids not all distinct and non-zero: {ids}")
    checks.check(all(i >= 1 << 32 for i in ids), f"lease ids below 2^32 (not random 64-bit values): {ids}")
    steps = {b - a for a, b in zip(ids, ids[1:])}
    checks.check(len(steps) > 1, f"lease ids advance by a constant step {steps}: {ids}")
    for i in range(16):
        victim.scheduler(Op.RELEASE, p.release(0, f"unpredictable-{i}"))
    victim.check_intact(checks)
    checks.verify()


# ---------------------------------------------------------------------------------------------- 5. administration

def test_clear_from_another_uid_is_refused(hostile_sidecar, victim, foreign_agent):
    s, checks = hostile_sidecar, Checks()
    before = s.stats()
    a = foreign_agent
    a.connect("c", s.socket_path)
    require(a.hello("c", unique("janitor"), "client"), "the attacker's HELLO")
    checks.code(a.call("c", Op.CLEAR), E.PERMISSION_DENIED, "CLEAR from uid 65534")
    after = s.stats()
    stat_check(checks, before, after, "chunks", why="the refused CLEAR removed chunks")
    victim.check_intact(checks)
    counters_moved(checks, before, after, ["permission_denied"])
    # Control: the sidecar's own uid may clear (the refusal is about who asks, not CLEAR itself).
    with s.client(unique("admin")) as admin:
        cleared = admin.call(Op.CLEAR)
    checks.check(cleared.ok, f"CLEAR from root: {code_name(cleared.code)} {cleared.describe()}")
    checks.check(victim.hits() == 0, "the victim's chunks survived root's CLEAR")
    check_serving(checks, s)
    checks.verify()
