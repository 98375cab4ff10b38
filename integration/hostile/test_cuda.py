"""Attacks on the GPU data plane (docs/security.md, "GPU memory"): REGISTERs of CUDA IPC memory that name another
process, carry forged or malformed handles and events, reach past the exported allocation, or name GPUs the
sidecar cannot see. The sidecar loads the CUDA driver double (tests/cuda_double) in place of libcuda.so.1; the
victim is a separate process that exported a real handle of the double. After each attack: the refusal code, no
mapping left open, the victim's memory unchanged, and a fresh client served."""

import os
import subprocess
import sys
import time

import pytest

from daemon import Sidecar
from fake_engine.model import remove_device_memory
from wire import E, Op, RawConn, code_name, p, unique

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UUID = "GPU-facecda0-0000-0000-0000-000000000000"
BLOCKS, BLOCK_TOKENS, HEADS, ROW = 16, 16, 2, 64
BLOCK_BYTES = BLOCK_TOKENS * HEADS * ROW
LAYER_BYTES = 2 * BLOCKS * BLOCK_BYTES


class Exporter:
    """The victim: a process holding "device" memory of the double, filled with a secret pattern."""

    def __init__(self, library):
        script = os.path.join(ROOT, "tests", "cuda_double", "exporter.py")
        self.proc = subprocess.Popen([sys.executable, script, library], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        ready = self.proc.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        self.pid = int(ready[1])
        ptr, handle = self.ask(f"alloc {LAYER_BYTES}").split()
        self.ptr, self.handle = int(ptr), bytes.fromhex(handle)
        self.ask(f"fill {self.ptr} 0 {LAYER_BYTES} 4242")

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert not answer.startswith("err"), answer
        return answer

    def digest(self):
        return self.ask(f"hash {self.ptr} 0 {LAYER_BYTES}")

    def close(self):
        self.proc.kill()
        self.proc.wait()
        remove_device_memory([self.pid])


@pytest.fixture(scope="module")
def cuda_sidecar(sidecar_built, cuda_double):
    s = Sidecar("Gpu=required", f"CudaDriverLibrary={cuda_double}", name="cuda")
    yield s
    s.stop()


@pytest.fixture
def victim(cuda_double):
    v = Exporter(cuda_double)
    yield v
    v.close()


def register(conn, handle, pid=0, offset=0, length=LAYER_BYTES, uuid=UUID, store_event=None):
    ns = p.namespace("hostile-cuda", "bfloat16", BLOCK_TOKENS, 2 * BLOCK_TOKENS, 1, 0)
    layout = p.layout(2, BLOCKS, BLOCK_TOKENS, HEADS, ROW, BLOCK_BYTES, HEADS * ROW, ROW, 0, BLOCKS * BLOCK_BYTES)
    layer = ["l0", p.memory_ref_cuda(handle, uuid, offset, length, pid), layout]
    return conn.call(Op.REGISTER, p.register(ns, [layer], store_event))


def mappings(sidecar):
    with RawConn(sidecar.socket_path) as c:
        assert c.hello(unique("stats"), "client").ok
        return dict(zip(p.STATS_FIELDS, c.call(Op.STATS).fields))["gpu_mappings"]


ATTACKS = {
    "another process's pid": (dict(pid="victim"), E.PERMISSION_DENIED),
    "a forged handle": (dict(handle=b"\x46\x43\x49\x50" + os.urandom(60)), E.MEMORY_FAULT),
    "random handle bytes": (dict(handle=os.urandom(64)), E.MEMORY_FAULT),
    "a short handle": (dict(handle=b"\x00" * 16), E.BAD_LAYOUT),
    "an event handle of 10 bytes": (dict(store_event=b"\x00" * 10), E.BAD_REQUEST),
    "a forged event handle": (dict(store_event=os.urandom(64)), E.UNSUPPORTED),
    "an offset past the allocation": (dict(offset=LAYER_BYTES), E.OUT_OF_RANGE),
    "a length past the allocation": (dict(length=2 * LAYER_BYTES), E.OUT_OF_RANGE),
    "a length of 2^63": (dict(length=1 << 63), E.BAD_LAYOUT),
    "a GPU the sidecar cannot see": (dict(uuid="GPU-00000000-1111-2222-3333-444444444444"), E.UNSUPPORTED),
    "a device that is no UUID": (dict(uuid="cuda:0"), E.BAD_LAYOUT),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_cuda_register_attack_is_refused_and_contained(cuda_sidecar, victim, attack):
    changes, expected = ATTACKS[attack]
    before = victim.digest()
    args = dict(handle=victim.handle)
    args.update(changes)
    if args.get("pid") == "victim":
        args["pid"] = victim.pid
    with RawConn(cuda_sidecar.socket_path) as c:
        assert c.hello(unique("attacker")).ok
        r = register(c, **args)
        assert r.code == expected, f"{attack}: {code_name(r.code)} {r.describe()}"
    assert mappings(cuda_sidecar) == 0, f"{attack} left a mapping of the victim's memory open"
    assert victim.digest() == before
    served, detail = cuda_sidecar.serve_check()
    assert served, detail


def test_cuda_register_with_the_victims_own_handle_and_pid_zero_maps_only_until_the_connection_ends(cuda_sidecar,
                                                                                                    victim):
    """The handle itself is the capability (whoever holds its bytes can map it with the CUDA API directly); the
    sidecar adds nothing to it: the mapping lives only as long as the registering connection."""
    with RawConn(cuda_sidecar.socket_path) as c:
        assert c.hello(unique("holder")).ok
        assert register(c, victim.handle).ok
        assert mappings(cuda_sidecar) == 1
    deadline = time.monotonic() + 10
    while mappings(cuda_sidecar) != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mappings(cuda_sidecar) == 0
