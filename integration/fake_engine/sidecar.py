"""The one launcher of a real kvsidecar daemon, for the integration scenarios, the demo, the benchmarks and
the hostile-client tests: ``dotnet kvsidecar.dll --socket ...`` on a private socket, waiting for its
``READY `` line, with its output kept. Standard library only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_BUILT = "the sidecar is not built: run scripts/publish.sh (or set KVSIDECAR_BIN)"


def sidecar_bin() -> Optional[str]:
    """$KVSIDECAR_BIN, else out/sidecar/kvsidecar.dll of this checkout; None when it does not exist."""
    path = os.environ.get("KVSIDECAR_BIN") or os.path.join(REPO, "out", "sidecar", "kvsidecar.dll")
    return path if os.path.exists(path) else None


def shared_tmp() -> str:
    """A temporary directory that other users can traverse (every ancestor o+x), for a sidecar's socket and
    the hostile tests' agent files: an attacker of another uid must reach them for a test to mean anything."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        path, ok = os.path.abspath(candidate), os.path.isdir(candidate)
        while ok and path != "/":
            ok = bool(os.stat(path).st_mode & 0o001)
            path = os.path.dirname(path)
        if ok:
            return candidate
    return tempfile.gettempdir()


class SidecarStartError(RuntimeError):
    """The sidecar exited, or did not print READY in time; ``log`` is its output."""

    def __init__(self, message: str, returncode: Optional[int], log: str):
        super().__init__(f"{message} (exit code {returncode}):\n{log[-4000:]}")
        self.returncode = returncode
        self.log = log


class SidecarProcess:
    """A real kvsidecar on a private socket; can be killed and restarted on the same socket.

    ``extra_args`` follow the socket and sizes on the command line (e.g. ``--Sidecar:SendTimeout=00:00:02``).
    With ``shared_dir`` the socket's directory lies where every user can traverse it and is 0755, so that a
    process of another uid in the socket's group can connect to the 0660 socket."""

    def __init__(self, capacity_bytes: int = 512 << 20, socket_path: Optional[str] = None,
                 extra_args: Sequence[str] = (), extent_bytes: Optional[int] = None, shared_dir: bool = False,
                 ready_timeout: float = 30.0, name: str = "sidecar"):
        self.bin = sidecar_bin()
        if self.bin is None:
            raise FileNotFoundError("kvsidecar.dll not found: run scripts/publish.sh or set KVSIDECAR_BIN")
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.ready_timeout = ready_timeout
        self.dir = tempfile.mkdtemp(prefix=f"kvsc-{name}-", dir=shared_tmp() if shared_dir else None)
        if shared_dir:
            os.chmod(self.dir, 0o755)
        self.socket_path = socket_path or os.path.join(self.dir, "s.sock")
        self.args = ["dotnet", self.bin, "--socket", self.socket_path, "--capacity-bytes", str(capacity_bytes),
                     "--extent-bytes", str(extent_bytes or min(capacity_bytes, 64 << 20)), *extra_args]
        self.proc: Optional[subprocess.Popen] = None
        self.lines: List[str] = []
        self.ready_at: Optional[float] = None  # time.monotonic() when the last start printed READY
        self.start()

    def start(self) -> None:
        """Starts the daemon (again, after :meth:`kill`, on the same socket) and waits for READY; raises
        SidecarStartError when it exits first or is not READY within ``ready_timeout``."""
        ready = threading.Event()
        self.ready_at = None
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace")
        reader = threading.Thread(target=self._read_output, args=(self.proc, ready), daemon=True,
                                  name=f"{self.name}-log")
        reader.start()
        deadline = time.monotonic() + self.ready_timeout
        while not ready.wait(0.05) and self.proc.poll() is None and time.monotonic() < deadline:
            pass
        if ready.is_set():
            return
        exited = self.proc.poll() is not None
        if not exited:
            self.kill()
        self.proc.wait(timeout=10)
        reader.join(timeout=5)
        raise SidecarStartError("the sidecar did not print READY" if exited else
                                f"the sidecar was not READY within {self.ready_timeout:.0f} s", self.proc.returncode,
                                self.log())

    def _read_output(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        for line in proc.stdout:
            self.lines.append(line)
            if line.startswith("READY "):
                self.ready_at = time.monotonic()
                ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, last: int = 60) -> str:
        """The daemon's last ``last`` lines of output."""
        return "".join(self.lines[-last:])

    def pause(self) -> None:
        """SIGSTOP: the daemon stops answering, its socket stays (a stalled sidecar); :meth:`resume` undoes it."""
        if self.alive():
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL; :meth:`start` brings it back on the same socket."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 20 s), and the socket's directory is removed: the end of this sidecar."""
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)  # a paused daemon would not act on SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def read_stats(socket_path: str) -> tuple:
    """(STATS by field name, with each tier's counters by name; the server's HELLO capabilities) of a running sidecar."""
    from csharp_kv import protocol as p
    from csharp_kv.client import SidecarClient

    c = SidecarClient(socket_path, "stats-probe", "client")
    try:
        if not c.ensure_connected(wait=5):
            raise ConnectionError(f"no sidecar answers on {socket_path}")
        reply = c.call(p.Opcode.STATS)
        if not reply.ok:
            raise ConnectionError(f"STATS failed: {reply.error}")
        stats = dict(zip(p.STATS_FIELDS, reply.fields))
        stats["tiers"] = [dict(zip(p.TIER_STATS_FIELDS, t)) for t in (stats.get("tiers") or [])]
        return stats, c.server_capabilities
    finally:
        c.close()
