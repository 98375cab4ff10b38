"""The daemon under attack: a kvsidecar started with the settings an attack needs (on the shared launcher,
:mod:`fake_engine.sidecar`), its STATS and memory, whether it still serves a well-behaved client, and soft
checks that report every broken expectation of an attack at once."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from pool import tb
from wire import MiB, Op, RawConn, Reply, code_name, p, unique

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    from fake_engine.sidecar import SidecarProcess, shared_tmp  # noqa: F401 - shared_tmp is for agents.py
except ImportError:  # run without the integration conftest, which puts integration/ on sys.path
    sys.path.insert(0, os.path.dirname(HERE))
    from fake_engine.sidecar import SidecarProcess, shared_tmp  # noqa: F401


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Polls ``predicate`` until it returns something truthy or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- checks

class Checks:
    """Soft assertions: an attack test records every expectation (the refusal code, the victim's memory,
    the victim's lookups, the daemon's health, the counters) and :meth:`verify` fails with all that broke."""

    def __init__(self, context: str = ""):
        self.context = context
        self.failures: List[str] = []
        self.count = 0

    def check(self, condition: Any, message: str) -> bool:
        self.count += 1
        if not condition:
            self.failures.append(message)
        return bool(condition)

    def code(self, reply: "Reply", expected: int, what: str) -> bool:
        return self.check(reply.code == expected,
                          f"{what}: expected {code_name(expected)}, got {code_name(reply.code)} {reply.describe()}")

    def refused(self, reply: "Reply", what: str) -> bool:
        return self.check(not reply.ok, f"{what}: expected a refusal, got OK {reply.fields!r}")

    def verify(self) -> None:
        assert self.count > 0, "a test that checked nothing"
        if self.failures:
            head = f"{len(self.failures)} of {self.count} checks failed" + (f" ({self.context})" if self.context else "")
            raise AssertionError(head + ":\n  - " + "\n  - ".join(self.failures))


# ---------------------------------------------------------------------------------------------- sidecar

TIGHT_MAX_CONNECTIONS = 16
TIGHT_MAX_LEASES = 8
TIGHT_MAX_CHUNK_BYTES = 1 << 20
TIGHT_SETTINGS = (f"MaxConnections={TIGHT_MAX_CONNECTIONS}", "HelloTimeout=00:00:01",
                  f"MaxLeasesPerConnection={TIGHT_MAX_LEASES}", f"MaxChunkBytes={TIGHT_MAX_CHUNK_BYTES}",
                  "SendTimeout=00:00:02")


class Sidecar(SidecarProcess):
    """A kvsidecar on a private socket, started with ``--Sidecar:<Name>=<value>`` settings.

    The socket's directory is made traversable (0755) so that a process of another uid in the socket's
    group can connect to the 0660 socket."""

    def __init__(self, *settings: str, capacity_bytes: int = 64 * MiB, extent_bytes: Optional[int] = None,
                 ready_timeout: float = 30.0, name: str = "sidecar"):
        self.settings = settings
        super().__init__(capacity_bytes, extra_args=[s if s.startswith("--") else f"--Sidecar:{s}" for s in settings],
                         extent_bytes=extent_bytes, shared_dir=True, ready_timeout=ready_timeout, name=name)

    # -- process
    def _status_kb(self, key: str) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return -1

    def rss_bytes(self) -> int:
        """VmRSS now."""
        return self._status_kb("VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        """VmHWM: the most resident memory the daemon ever had."""
        return self._status_kb("VmHWM") * 1024

    # -- clients
    def connect(self, timeout: float = 5.0) -> RawConn:
        return RawConn(self.socket_path, timeout)

    def client(self, instance: Optional[str] = None, role: str = "client", timeout: float = 5.0) -> RawConn:
        """A connection that said HELLO (raises if the HELLO failed)."""
        c = self.connect(timeout)
        r = c.hello(instance or unique("client"), role, timeout=timeout)
        if not r.ok:
            c.close()
            raise AssertionError(f"HELLO of a well-behaved client failed: {code_name(r.code)} {r.describe()}")
        return c

    def stats(self, timeout: float = 5.0) -> "Stats":
        """STATS by name from a fresh connection; a field this server does not send is None, and when STATS
        cannot be had at all every field is None and ``error`` says why (a containment failure, not a crash)."""
        try:
            with RawConn(self.socket_path, timeout) as c:
                hello = c.hello(unique("stats"), "client", timeout=timeout)
                r = c.call(Op.STATS, None, timeout) if hello.ok else hello
        except OSError as e:
            return Stats.unavailable(f"connect failed: {e}")
        if not r.ok:
            return Stats.unavailable(f"{code_name(r.code)} {r.describe()}")
        return Stats({name: p.field(r.fields, i) for i, name in enumerate(p.STATS_FIELDS)})

    def wait_stat(self, name: str, predicate: Callable[[int], bool], timeout: float) -> Tuple[bool, Any]:
        """Polls STATS until ``predicate(value of name)`` holds; (whether it did, the last value or why there was none)."""
        last: List[Any] = [None]

        def probe() -> bool:
            stats = self.stats()
            value = stats.get(name)
            last[0] = value if value is not None else (stats.error or "not sent by this server")
            return value is not None and predicate(value)

        return bool(wait_until(probe, timeout, interval=0.1)), last[0]

    def serve_check(self, timeout: float = 5.0) -> Tuple[bool, str]:
        """Whether a fresh well-behaved client gets HELLO, PING and LOOKUP answered within ``timeout`` in all."""
        if not self.alive():
            return False, f"the sidecar exited with {self.proc.returncode}:\n{self.log()}"
        t0 = time.monotonic()
        try:
            c = RawConn(self.socket_path, timeout)
        except OSError as e:
            return False, f"connect failed: {e}"
        with c:
            steps = [("HELLO", lambda left: c.hello(unique("probe"), "scheduler", timeout=left)),
                     ("PING", lambda left: c.call(Op.PING, [0xC0FFEE], left)),
                     ("LOOKUP", lambda left: c.call(Op.LOOKUP, p.lookup("probe", None, tb(range(64)), False), left))]
            for name, step in steps:
                left = timeout - (time.monotonic() - t0)
                r = step(max(left, 0.01))
                if not r.ok:
                    return False, f"a fresh client's {name} got {code_name(r.code)} {r.describe()} " \
                                  f"after {time.monotonic() - t0:.2f} s"
        return True, f"served in {time.monotonic() - t0:.2f} s"



class Stats(dict):
    """STATS fields by name (None: not sent by this server)."""

    error = ""

    @classmethod
    def unavailable(cls, why: str) -> "Stats":
        s = cls({name: None for name in p.STATS_FIELDS})
        s.error = f"STATS unavailable: {why}"
        return s


def stat_check(checks: Checks, before: Stats, after: Stats, name: str, op: str = "==", delta: int = 0,
               why: str = "") -> bool:
    """STATS ``name`` after ``op`` (its value before + ``delta``), e.g. ("chunks", "==") or ("registrations", "<=", 1)."""
    b, a = before.get(name), after.get(name)
    if a is None or b is None:
        return checks.check(False, f"STATS {name}: {before.error or after.error or 'no such field'}")
    ok = {"==": a == b + delta, "<=": a <= b + delta, "<": a < b + delta, ">=": a >= b + delta}[op]
    return checks.check(ok, f"STATS {name} went {b} -> {a}, expected {op} {b + delta}" + (f": {why}" if why else ""))


def counters_moved(checks: Checks, before: Stats, after: Stats, names: Sequence[str], by: int = 1) -> None:
    for name in names:
        b, a = before.get(name), after.get(name)
        if a is None:
            checks.check(False, f"STATS {name} (field {p.STATS_FIELDS.index(name)}): "
                                f"{after.error or 'not sent by this server'}")
        else:
            checks.check(a - (b or 0) >= by, f"STATS {name} moved by {a - (b or 0)}, expected at least {by}")


def check_serving(checks: Checks, sidecar: Sidecar, timeout: float = 5.0) -> None:
    ok, detail = sidecar.serve_check(timeout)
    checks.check(ok, f"the sidecar does not serve a fresh client: {detail}")
