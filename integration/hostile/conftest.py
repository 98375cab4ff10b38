"""Fixtures of the hostile-client tests: sidecars started with the settings an attack needs, a victim
engine per test, and attacker processes (of this uid, or of another uid where the run is root).

Each attack test (test_identity.py, test_limits.py, test_connections.py) asserts that the attack is refused
with the right error code AND that it is contained: the victim engine's memory is unchanged, the victim's
lookups still hit, the daemon is alive and serves a fresh well-behaved client, and STATS shows it. Where an
attack that should have been refused goes through, the test carries on as a real attacker would (copies
the victim's memory out, overwrites it, evicts, releases...), so a failure says what the hole allows, not
only that a code was wrong. Each test reports every broken expectation at once (Checks).

``hostile_sidecar`` and ``tight_sidecar`` are shared by the attack tests of every file here, and a test
marked ``after_attacks`` runs after all other tests (it checks what the attacks left behind)."""

import pytest

from agents import FOREIGN_UID, Agent, Victim, foreign_uid_unavailable
from daemon import TIGHT_SETTINGS, Sidecar
from fake_engine.sidecar import NOT_BUILT, sidecar_bin


def pytest_configure(config):
    config.addinivalue_line("markers", "after_attacks: runs after every other test, on what the attacks left")


def pytest_collection_modifyitems(items):
    last = [item for item in items if item.get_closest_marker("after_attacks")]
    items[:] = [item for item in items if item not in last] + last


@pytest.fixture(scope="session")
def sidecar_built():
    if sidecar_bin() is None:
        pytest.skip(NOT_BUILT)


@pytest.fixture(scope="session")
def hostile_sidecar(sidecar_built):
    """The sidecar most attacks run against: 64 MiB of L1, default bounds, a short SendTimeout so that a
    client that never reads is dropped quickly."""
    s = Sidecar("SendTimeout=00:00:02", name="hostile")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tight_sidecar(sidecar_built):
    """Small connection, lease and chunk-size limits and a short HelloTimeout (daemon.TIGHT_SETTINGS)."""
    s = Sidecar(*TIGHT_SETTINGS, name="tight")
    yield s
    s.stop()


@pytest.fixture
def fresh_sidecar(sidecar_built):
    """A sidecar of its own, for an attack that may leave a vulnerable daemon damaged."""
    s = Sidecar(name="fresh")
    yield s
    s.stop()


@pytest.fixture
def victim(hostile_sidecar, request):
    v = Victim(hostile_sidecar, request.node.name)
    yield v
    v.close()


@pytest.fixture
def foreign_agent():
    """An attacker process running as uid 65534 in group 0, so it may open the 0660 root:root socket."""
    reason = foreign_uid_unavailable()
    if reason:
        pytest.skip(reason)
    a = Agent(name="foreign attacker", uid=FOREIGN_UID, gid=0)
    assert a.uid == FOREIGN_UID, f"the attacker runs as uid {a.uid}, not {FOREIGN_UID}"
    yield a
    a.stop()
