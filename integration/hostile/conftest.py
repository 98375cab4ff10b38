"""Fixtures of the hostile-client tests: sidecars started with the settings an attack needs, a victim
engine per test, and attacker processes (of this uid, or of another uid where the run is root)."""

import pytest

import harness as h


def _start(*settings, **kw) -> h.Sidecar:
    if h.sidecar_dll() is None:
        pytest.skip("the sidecar is not built: run scripts/publish.sh (or set KVSIDECAR_BIN)")
    return h.Sidecar(*settings, **kw)


@pytest.fixture(scope="module")
def hostile_sidecar():
    """The sidecar most attacks run against: 64 MiB of L1, default bounds, a short SendTimeout so that a
    client that never reads is dropped quickly."""
    s = _start("SendTimeout=00:00:02", name="hostile")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tight_sidecar():
    """Small connection, lease and chunk-size limits and a short HelloTimeout (harness.TIGHT_SETTINGS)."""
    s = _start(*h.TIGHT_SETTINGS, name="tight")
    yield s
    s.stop()


@pytest.fixture
def fresh_sidecar():
    """A sidecar of its own, for an attack that may leave a vulnerable daemon damaged."""
    s = _start(name="fresh")
    yield s
    s.stop()


@pytest.fixture
def victim(hostile_sidecar, request):
    v = h.Victim(hostile_sidecar, request.node.name)
    yield v
    v.close()


@pytest.fixture
def foreign_agent():
    """An attacker process running as uid 65534 in group 0, so it may open the 0660 root:root socket."""
    reason = h.foreign_uid_unavailable()
    if reason:
        pytest.skip(reason)
    a = h.Agent(name="foreign attacker", uid=h.FOREIGN_UID, gid=0)
    assert a.uid == h.FOREIGN_UID, f"the attacker runs as uid {a.uid}, not {h.FOREIGN_UID}"
    yield a
    a.stop()
