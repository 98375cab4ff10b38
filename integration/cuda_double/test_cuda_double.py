"""Tests of the CUDA driver test double (tests/cuda_double) itself, through ctypes.

The library is built with tests/cuda_double/build.sh (skipped when gcc is missing). Cross-process
tests run this file as a script in a child Python process (`python3 test_cuda_double.py <mode> ...`).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from ctypes import POINTER, byref, c_char_p, c_int, c_longlong, c_size_t, c_uint, c_ulonglong, c_void_p

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(REPO, "tests", "cuda_double", "build.sh")

SUCCESS, INVALID_VALUE, OUT_OF_MEMORY, NOT_INITIALIZED = 0, 1, 2, 3
NO_DEVICE, INVALID_DEVICE, INVALID_CONTEXT, INVALID_HANDLE = 100, 101, 201, 400
NOT_FOUND, NOT_READY, ALREADY_REGISTERED, NOT_REGISTERED = 500, 600, 712, 713
EVENT_DISABLE_TIMING, EVENT_INTERPROCESS = 2, 4


class Handle64(ctypes.Structure):
    """CUipcMemHandle / CUipcEventHandle: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_ubyte * 64)]


class MemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", c_int),
        ("srcLocType", c_int),
        ("srcLocId", c_int),
        ("dstLocType", c_int),
        ("dstLocId", c_int),
        ("flags", c_uint),
    ]


U64P = POINTER(c_ulonglong)
SZP = POINTER(c_size_t)
BATCH_13 = ctypes.CFUNCTYPE(c_int, U64P, U64P, SZP, c_size_t, POINTER(MemcpyAttributes), SZP, c_size_t, c_void_p)
BATCH_128 = ctypes.CFUNCTYPE(c_int, U64P, U64P, SZP, c_size_t, POINTER(MemcpyAttributes), SZP, c_size_t, SZP, c_void_p)

SIGNATURES = {
    "cuInit": [c_uint],
    "cuDriverGetVersion": [POINTER(c_int)],
    "cuGetErrorName": [c_int, POINTER(c_char_p)],
    "cuGetErrorString": [c_int, POINTER(c_char_p)],
    "cuGetProcAddress_v2": [c_char_p, POINTER(c_void_p), c_int, c_ulonglong, POINTER(c_int)],
    "cuDeviceGetCount": [POINTER(c_int)],
    "cuDeviceGet": [POINTER(c_int), c_int],
    "cuDeviceGetUuid": [c_char_p, c_int],
    "cuDeviceGetUuid_v2": [c_char_p, c_int],
    "cuDeviceGetAttribute": [POINTER(c_int), c_int, c_int],
    "cuDeviceGetName": [c_char_p, c_int, c_int],
    "cuDevicePrimaryCtxRetain": [POINTER(c_void_p), c_int],
    "cuDevicePrimaryCtxRelease_v2": [c_int],
    "cuCtxSetCurrent": [c_void_p],
    "cuCtxGetCurrent": [POINTER(c_void_p)],
    "cuCtxSynchronize": [],
    "cuMemAlloc_v2": [U64P, c_size_t],
    "cuMemFree_v2": [c_ulonglong],
    "cuMemGetAddressRange_v2": [U64P, SZP, c_ulonglong],
    "cuPointerGetAttribute": [c_void_p, c_int, c_ulonglong],
    "cuIpcGetMemHandle": [POINTER(Handle64), c_ulonglong],
    "cuIpcOpenMemHandle_v2": [U64P, Handle64, c_uint],
    "cuIpcCloseMemHandle": [c_ulonglong],
    "cuIpcGetEventHandle": [POINTER(Handle64), c_void_p],
    "cuIpcOpenEventHandle": [POINTER(c_void_p), Handle64],
    "cuMemHostAlloc": [POINTER(c_void_p), c_size_t, c_uint],
    "cuMemFreeHost": [c_void_p],
    "cuMemHostRegister_v2": [c_void_p, c_size_t, c_uint],
    "cuMemHostUnregister": [c_void_p],
    "cuMemHostGetDevicePointer_v2": [U64P, c_void_p, c_uint],
    "cuStreamCreate": [POINTER(c_void_p), c_uint],
    "cuStreamDestroy_v2": [c_void_p],
    "cuStreamSynchronize": [c_void_p],
    "cuStreamQuery": [c_void_p],
    "cuStreamWaitEvent": [c_void_p, c_void_p, c_uint],
    "cuEventCreate": [POINTER(c_void_p), c_uint],
    "cuEventDestroy_v2": [c_void_p],
    "cuEventRecord": [c_void_p, c_void_p],
    "cuEventQuery": [c_void_p],
    "cuEventSynchronize": [c_void_p],
    "cuMemcpyDtoHAsync_v2": [c_void_p, c_ulonglong, c_size_t, c_void_p],
    "cuMemcpyHtoDAsync_v2": [c_ulonglong, c_void_p, c_size_t, c_void_p],
    "cuMemcpyDtoDAsync_v2": [c_ulonglong, c_ulonglong, c_size_t, c_void_p],
    "cuMemcpyAsync": [c_ulonglong, c_ulonglong, c_size_t, c_void_p],
    "fakecuda_inject": [c_char_p, c_int, c_int, c_int],
    "fakecuda_reset": [],
    "fakecuda_counter": [c_char_p],
    "fakecuda_set_copy_delay_us": [c_int],
    "fakecuda_set_batch_available": [c_int],
    "fakecuda_set_pin_limit": [c_longlong],
    "fakecuda_mark_vmm": [c_ulonglong],
}


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = c_int
    lib.fakecuda_counter.restype = c_longlong
    lib.fakecuda_reset.restype = None
    for name in ("fakecuda_set_copy_delay_us", "fakecuda_set_batch_available", "fakecuda_set_pin_limit"):
        getattr(lib, name).restype = None
    return lib


def ok(rc: int) -> None:
    assert rc == SUCCESS, f"CUresult {rc}"


def make_current(lib: ctypes.CDLL, dev: int = 0) -> c_void_p:
    ok(lib.cuInit(0))
    ctx = c_void_p()
    ok(lib.cuDevicePrimaryCtxRetain(byref(ctx), dev))
    ok(lib.cuCtxSetCurrent(ctx))
    return ctx


def alloc(lib: ctypes.CDLL, n: int) -> int:
    d = c_ulonglong()
    ok(lib.cuMemAlloc_v2(byref(d), n))
    return d.value


def stream(lib: ctypes.CDLL) -> c_void_p:
    s = c_void_p()
    ok(lib.cuStreamCreate(byref(s), 1))
    return s


def event(lib: ctypes.CDLL, flags: int = EVENT_DISABLE_TIMING) -> c_void_p:
    e = c_void_p()
    ok(lib.cuEventCreate(byref(e), flags))
    return e


def write(lib, dptr: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    ok(lib.cuMemcpyHtoDAsync_v2(dptr, buf, len(data), None))


def read(lib, dptr: int, n: int) -> bytes:
    buf = ctypes.create_string_buffer(n)
    ok(lib.cuMemcpyDtoHAsync_v2(buf, dptr, n, None))
    return buf.raw


def counter(lib, name: str) -> int:
    return lib.fakecuda_counter(name.encode())


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


# ---------------------------------------------------------------------------------------------------
# Child process modes (run as `python3 test_cuda_double.py <mode> <so> ...`)
# ---------------------------------------------------------------------------------------------------


def _child_ipc(so: str, mem_hex: str, ev_hex: str, size: int) -> None:
    """Opens the parent's memory and event handles, checks and writes bytes, reports JSON lines."""
    lib = load(so)
    make_current(lib)
    h = Handle64.from_buffer_copy(bytes.fromhex(mem_hex))
    eh = Handle64.from_buffer_copy(bytes.fromhex(ev_hex))
    out = {}
    p1, p2 = c_ulonglong(), c_ulonglong()
    ok(lib.cuIpcOpenMemHandle_v2(byref(p1), h, 1))
    ok(lib.cuIpcOpenMemHandle_v2(byref(p2), h, 1))  # same process: refcount, same pointer
    out["same_pointer"] = p1.value == p2.value
    base, rsize = c_ulonglong(), c_size_t()
    ok(lib.cuMemGetAddressRange_v2(byref(base), byref(rsize), p1.value + 100))
    out["range"] = [base.value == p1.value, rsize.value]
    ev = c_void_p()
    ok(lib.cuIpcOpenEventHandle(byref(ev), eh))
    out["event_query_first"] = lib.cuEventQuery(ev)
    s = stream(lib)
    ok(lib.cuStreamWaitEvent(s, ev, 0))  # the parent's delayed copy must be done before our read
    buf = ctypes.create_string_buffer(4096)
    ok(lib.cuMemcpyDtoHAsync_v2(buf, p1.value, 4096, s))
    ok(lib.cuStreamSynchronize(s))
    out["head"] = buf.raw.hex()
    ok(lib.cuEventSynchronize(ev))
    out["tail"] = read(lib, p1.value + size - 16, 16).hex()
    write(lib, p1.value + 8192, b"child wrote this")
    out["ipc_opens"] = counter(lib, "ipc_opens")
    out["close1"] = lib.cuIpcCloseMemHandle(p1.value)  # one close unmaps for every user
    out["close2"] = lib.cuIpcCloseMemHandle(p1.value)
    out["open_mappings"] = counter(lib, "open_mappings")
    ok(lib.cuStreamDestroy_v2(s))
    ok(lib.cuEventDestroy_v2(ev))
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # the parent has freed the allocation
    p3 = c_ulonglong()
    print(json.dumps({"reopen_after_free": lib.cuIpcOpenMemHandle_v2(byref(p3), h, 0)}), flush=True)


def _child_env(so: str) -> None:
    """Reports what the library does under the FAKECUDA_* variables this process was started with."""
    lib = load(so)
    out = {}
    n, v = c_int(), c_int()
    out["count_before_init"] = lib.cuDeviceGetCount(byref(n))
    out["version_rc"] = lib.cuDriverGetVersion(byref(v))
    out["version"] = v.value
    out["init"] = lib.cuInit(0)
    if out["init"] == SUCCESS:
        ok(lib.cuDeviceGetCount(byref(n)))
        out["count"] = n.value
        uuid = ctypes.create_string_buffer(16)
        ok(lib.cuDeviceGetUuid_v2(uuid, n.value - 1))
        out["last_uuid"] = uuid.raw.hex()
        make_current(lib)
        out["allocs"] = [lib.cuMemAlloc_v2(byref(c_ulonglong()), 64) for _ in range(3)]
        fn, st = c_void_p(), c_int(-1)
        out["batch"] = [lib.cuGetProcAddress_v2(b"cuMemcpyBatchAsync", byref(fn), 13000, 0, byref(st)), st.value]
    print(json.dumps(out), flush=True)


def run_child(so: str, mode: str, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), mode, so, *args], env=e, stdout=subprocess.PIPE, text=True, **kw
    )


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "ipc":
        _child_ipc(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif mode == "env":
        _child_env(sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def so_path() -> str:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot build the CUDA driver double")
    out = subprocess.run(["bash", BUILD], check=True, stdout=subprocess.PIPE, text=True).stdout
    path = out.strip().splitlines()[-1]
    assert os.path.isfile(path)
    return path


@pytest.fixture(scope="module")
def lib_module(so_path):
    lib = load(so_path)
    make_current(lib)
    return lib


@pytest.fixture
def lib(lib_module):
    lib_module.fakecuda_reset()
    make_current(lib_module)  # pytest may run tests on one thread; be explicit anyway
    yield lib_module
    lib_module.fakecuda_reset()


def test_environment_controls_in_child_processes(so_path):
    env = {"FAKECUDA_DEVICES": "3", "FAKECUDA_VERSION": "12080", "FAKECUDA_NO_BATCH": "1",
           "FAKECUDA_INJECT": "cuMemAlloc_v2=2@1x1"}
    a = run_child(so_path, "env", env=env)
    b = run_child(so_path, "env", env={"FAKECUDA_NO_DEVICE": "1"})
    ra, rb = json.loads(a.communicate(timeout=10)[0]), json.loads(b.communicate(timeout=10)[0])
    assert ra["count_before_init"] == NOT_INITIALIZED
    assert (ra["version_rc"], ra["version"], ra["init"], ra["count"]) == (SUCCESS, 12080, SUCCESS, 3)
    assert ra["last_uuid"] == "facecda0" + "00" * 11 + "02"
    assert ra["allocs"] == [SUCCESS, OUT_OF_MEMORY, SUCCESS]  # one success skipped, then fails once
    assert ra["batch"] == [NOT_FOUND, 1]  # SYMBOL_NOT_FOUND
    assert rb["init"] == NO_DEVICE and rb["version"] == 13000


def test_devices_contexts_and_errors(lib):
    n, d = c_int(), c_int()
    ok(lib.cuDeviceGetCount(byref(n)))
    assert n.value == int(os.environ.get("FAKECUDA_DEVICES", "1"))
    assert lib.cuDeviceGet(byref(d), 8) == INVALID_DEVICE
    uuid = ctypes.create_string_buffer(16)
    ok(lib.cuDeviceGetUuid(uuid, 0))
    assert uuid.raw == bytes([0xFA, 0xCE, 0xCD, 0xA0] + [0] * 12)
    name = ctypes.create_string_buffer(64)
    ok(lib.cuDeviceGetName(name, 64, 0))
    assert name.value == b"kvsidecar CUDA driver double"
    v = c_int()
    ok(lib.cuDeviceGetAttribute(byref(v), 91, 0))
    assert v.value == 1
    ok(lib.cuDeviceGetAttribute(byref(v), 75, 0))
    assert v.value == 0
    c1, c2 = c_void_p(), c_void_p()
    ok(lib.cuDevicePrimaryCtxRetain(byref(c1), 0))
    ok(lib.cuDevicePrimaryCtxRetain(byref(c2), 0))
    assert c1.value == c2.value
    ok(lib.cuDevicePrimaryCtxRelease_v2(0))
    ok(lib.cuDevicePrimaryCtxRelease_v2(0))
    s = c_char_p()
    ok(lib.cuGetErrorName(INVALID_CONTEXT, byref(s)))
    assert s.value == b"CUDA_ERROR_INVALID_CONTEXT"
    ok(lib.cuGetErrorString(NOT_READY, byref(s)))
    assert s.value == b"device not ready"
    assert lib.cuGetErrorName(12345, byref(s)) == INVALID_VALUE and s.value is None
    assert lib.cuMemAlloc_v2(None, 16) == INVALID_VALUE

    seen = {}

    def other_thread():  # the current context is per thread: a new thread has none
        cur = c_void_p(1)
        seen["get"] = (lib.cuCtxGetCurrent(byref(cur)), cur.value)
        seen["alloc"] = lib.cuMemAlloc_v2(byref(c_ulonglong()), 16)
        seen["stream"] = lib.cuStreamCreate(byref(c_void_p()), 0)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen == {"get": (SUCCESS, None), "alloc": INVALID_CONTEXT, "stream": INVALID_CONTEXT}


def test_device_memory_ranges_and_pointer_attributes(lib):
    allocs = counter(lib, "device_allocs")
    d = alloc(lib, 10000)
    assert counter(lib, "device_allocs") == allocs + 1
    base, size = c_ulonglong(), c_size_t()
    ok(lib.cuMemGetAddressRange_v2(byref(base), byref(size), d + 9999))
    assert (base.value, size.value) == (d, 10000)
    ok(lib.cuMemGetAddressRange_v2(None, None, d))
    assert lib.cuMemGetAddressRange_v2(byref(base), byref(size), d + 10000) == NOT_FOUND
    i, p, z = c_int(), c_ulonglong(), c_size_t()
    ok(lib.cuPointerGetAttribute(byref(i), 9, d + 5))
    assert i.value == 0
    ok(lib.cuPointerGetAttribute(byref(i), 10, d + 5))
    assert i.value == 1
    ok(lib.cuPointerGetAttribute(byref(p), 11, d + 5))
    ok(lib.cuPointerGetAttribute(byref(z), 12, d + 5))
    assert (p.value, z.value) == (d, 10000)
    assert lib.cuPointerGetAttribute(byref(i), 2, d) == INVALID_VALUE
    assert lib.cuPointerGetAttribute(byref(i), 9, 4096) == INVALID_VALUE
    h = Handle64()
    assert lib.cuIpcGetMemHandle(byref(h), d + 16) == INVALID_VALUE  # not the base
    ok(lib.cuIpcGetMemHandle(byref(h), d))
    assert bytes(h.reserved)[:4] == b"FCIP"
    assert lib.fakecuda_mark_vmm(d + 1) == 0 and lib.fakecuda_mark_vmm(4096) == 1
    ok(lib.cuPointerGetAttribute(byref(i), 10, d))
    assert i.value == 0
    assert lib.cuIpcGetMemHandle(byref(h), d) == INVALID_VALUE  # VMM: no legacy IPC
    ok(lib.cuMemFree_v2(d))
    assert lib.cuMemFree_v2(d) == INVALID_VALUE
    assert counter(lib, "device_allocs") == allocs


def test_pinned_host_memory(lib):
    before = counter(lib, "pinned_bytes")
    hp = c_void_p()
    ok(lib.cuMemHostAlloc(byref(hp), 5000, 3))
    assert hp.value % 4096 == 0 and ctypes.string_at(hp, 5000) == bytes(5000)
    buf = ctypes.create_string_buffer(1 << 16)
    addr = ctypes.addressof(buf)
    ok(lib.cuMemHostRegister_v2(addr, 4096, 3))
    assert lib.cuMemHostRegister_v2(addr + 100, 10, 0) == ALREADY_REGISTERED
    assert counter(lib, "pinned_bytes") == before + 5000 + 4096
    dp = c_ulonglong()
    ok(lib.cuMemHostGetDevicePointer_v2(byref(dp), addr + 10, 0))
    assert dp.value == addr + 10
    assert lib.cuMemHostGetDevicePointer_v2(byref(dp), addr + 4096, 0) == INVALID_VALUE
    lib.fakecuda_set_pin_limit(before + 5000 + 4096 + 1000)
    assert lib.cuMemHostRegister_v2(addr + 8192, 1001, 0) == OUT_OF_MEMORY
    ok(lib.cuMemHostRegister_v2(addr + 8192, 1000, 0))
    assert lib.cuMemHostUnregister(addr + 1) == NOT_REGISTERED
    assert lib.cuMemHostUnregister(hp) == NOT_REGISTERED  # host-alloc'd, not registered
    ok(lib.cuMemHostUnregister(addr))
    ok(lib.cuMemHostUnregister(addr + 8192))
    ok(lib.cuMemFreeHost(hp))
    assert counter(lib, "pinned_bytes") == before


def test_stream_copies_are_asynchronous_ordered_and_validated(lib):
    src, dst = alloc(lib, 1 << 16), alloc(lib, 1 << 16)
    s = stream(lib)
    data = pattern(1, 1 << 16)
    host_in = ctypes.create_string_buffer(data, len(data))
    host_out = ctypes.create_string_buffer(len(data))
    calls = counter(lib, "copy_calls")
    lib.fakecuda_set_copy_delay_us(100_000)
    t0 = time.monotonic()
    ok(lib.cuMemcpyHtoDAsync_v2(src, host_in, len(data), s))
    ok(lib.cuMemcpyDtoDAsync_v2(dst, src, len(data), s))
    ok(lib.cuMemcpyAsync(ctypes.addressof(host_out), dst, len(data), s))  # unified: device -> host
    assert time.monotonic() - t0 < 0.05  # enqueue does not wait for the copies
    assert lib.cuStreamQuery(s) == NOT_READY
    assert host_out.raw != data
    ok(lib.cuStreamSynchronize(s))
    assert host_out.raw == data and lib.cuStreamQuery(s) == SUCCESS
    lib.fakecuda_set_copy_delay_us(0)
    assert counter(lib, "copy_calls") == calls + 3
    # Validation at enqueue: device sides must lie inside one device range.
    assert lib.cuMemcpyDtoHAsync_v2(host_out, src + 1, 1 << 16, s) == INVALID_VALUE
    assert lib.cuMemcpyHtoDAsync_v2(ctypes.addressof(host_in), host_in, 16, s) == INVALID_VALUE
    assert lib.cuMemcpyDtoDAsync_v2(dst, src, (1 << 16) + 1, s) == INVALID_VALUE
    assert lib.cuMemcpyAsync(dst + 10, ctypes.addressof(host_in), 1 << 16, s) == INVALID_VALUE
    ok(lib.cuMemcpyDtoHAsync_v2(host_out, src + 1, 0, s))  # n == 0: nothing to do
    assert lib.cuMemcpyDtoHAsync_v2(host_out, src, 16, ctypes.c_void_p(0xDEAD)) == INVALID_HANDLE
    ok(lib.cuCtxSynchronize())
    ok(lib.cuStreamDestroy_v2(s))
    ok(lib.cuMemFree_v2(src))
    ok(lib.cuMemFree_v2(dst))


def test_events_and_stream_wait(lib):
    assert lib.cuEventCreate(byref(c_void_p()), EVENT_INTERPROCESS) == INVALID_VALUE
    a, b = stream(lib), stream(lib)
    ev = event(lib)
    d = alloc(lib, 4096)
    data = pattern(2, 4096)
    host_in = ctypes.create_string_buffer(data, 4096)
    host_out = ctypes.create_string_buffer(4096)
    ok(lib.cuEventQuery(ev))  # never recorded: complete
    waits = counter(lib, "stream_waits")
    lib.fakecuda_set_copy_delay_us(150_000)
    ok(lib.cuMemcpyHtoDAsync_v2(d, host_in, 4096, a))
    ok(lib.cuEventRecord(ev, a))
    ok(lib.cuStreamWaitEvent(b, ev, 0))  # b must not read before a's copy is done
    lib.fakecuda_set_copy_delay_us(0)
    ok(lib.cuMemcpyDtoHAsync_v2(host_out, d, 4096, b))
    assert lib.cuEventQuery(ev) == NOT_READY
    ok(lib.cuStreamSynchronize(b))
    assert host_out.raw == data
    ok(lib.cuEventQuery(ev))
    ok(lib.cuEventRecord(ev, None))  # NULL stream: complete at once
    ok(lib.cuEventSynchronize(ev))
    assert counter(lib, "stream_waits") == waits + 1
    h = Handle64()
    assert lib.cuIpcGetEventHandle(byref(h), ev) == INVALID_VALUE  # not INTERPROCESS
    for x in (a, b):
        ok(lib.cuStreamDestroy_v2(x))
    ok(lib.cuEventDestroy_v2(ev))
    assert lib.cuEventQuery(ev) == INVALID_HANDLE
    ok(lib.cuMemFree_v2(d))


def test_batch_copy_abis_through_get_proc_address(lib):
    fn, st = c_void_p(), c_int(-1)
    ok(lib.cuGetProcAddress_v2(b"cuMemcpyBatchAsync", byref(fn), 13000, 0, byref(st)))
    assert st.value == 0 and fn.value == ctypes.cast(lib.cuMemcpyBatchAsync_v2, c_void_p).value
    batch13 = BATCH_13(fn.value)
    ok(lib.cuGetProcAddress_v2(b"cuMemcpyBatchAsync", byref(fn), 12080, 0, None))
    assert fn.value == ctypes.cast(lib.cuMemcpyBatchAsync, c_void_p).value
    batch128 = BATCH_128(fn.value)
    assert lib.cuGetProcAddress_v2(b"cuMemcpyBatchAsync", byref(fn), 12060, 0, byref(st)) == NOT_FOUND
    assert st.value == 2 and fn.value is None
    lib.fakecuda_set_batch_available(0)
    assert lib.cuGetProcAddress_v2(b"cuMemcpyBatchAsync", byref(fn), 13000, 0, byref(st)) == NOT_FOUND
    assert st.value == 1 and fn.value is None
    lib.fakecuda_set_batch_available(1)
    ok(lib.cuGetProcAddress_v2(b"cuDeviceGetUuid", byref(fn), 13000, 0, byref(st)))
    assert fn.value == ctypes.cast(lib.cuDeviceGetUuid_v2, c_void_p).value
    ok(lib.cuGetProcAddress_v2(b"cuMemAlloc", byref(fn), 13000, 0, byref(st)))
    assert fn.value == ctypes.cast(lib.cuMemAlloc_v2, c_void_p).value
    assert lib.cuGetProcAddress_v2(b"cuNoSuchThing", byref(fn), 13000, 0, byref(st)) == NOT_FOUND and st.value == 1

    d = alloc(lib, 8192)
    host = ctypes.create_string_buffer(pattern(3, 8192), 8192)
    back = ctypes.create_string_buffer(8192)
    s = stream(lib)
    attrs = (MemcpyAttributes * 1)(MemcpyAttributes(1, 0, 0, 0, 0, 0))
    idx = (c_size_t * 2)(0, 1)
    n = 4
    dsts = (c_ulonglong * n)(*[d + i * 2048 for i in range(n)])
    srcs = (c_ulonglong * n)(*[ctypes.addressof(host) + i * 2048 for i in range(n)])
    sizes = (c_size_t * n)(*([2048] * n))
    calls = counter(lib, "batch_calls")
    ok(batch13(dsts, srcs, sizes, n, attrs, idx, 1, s))
    # 12.8 ABI, device -> host, reversed order of pieces.
    dsts2 = (c_ulonglong * n)(*[ctypes.addressof(back) + (n - 1 - i) * 2048 for i in range(n)])
    srcs2 = (c_ulonglong * n)(*[d + i * 2048 for i in range(n)])
    fail = c_size_t(7)
    ok(batch128(dsts2, srcs2, sizes, n, attrs, idx, 1, byref(fail), s))
    ok(lib.cuStreamSynchronize(s))
    want = b"".join(host.raw[i * 2048:(i + 1) * 2048] for i in reversed(range(n)))
    assert back.raw == want and counter(lib, "batch_calls") == calls + 2
    # Rules of the real driver.
    assert batch13(dsts, srcs, sizes, n, attrs, idx, 1, None) == INVALID_VALUE  # NULL stream
    assert batch13(dsts, srcs, sizes, 0, attrs, idx, 1, s) == INVALID_VALUE
    assert batch13(dsts, srcs, sizes, n, attrs, idx, 0, s) == INVALID_VALUE
    assert batch13(dsts, srcs, sizes, n, attrs, (c_size_t * 1)(1), 1, s) == INVALID_VALUE
    two = (MemcpyAttributes * 2)(MemcpyAttributes(1, 0, 0, 0, 0, 0), MemcpyAttributes(1, 0, 0, 0, 0, 0))
    assert batch13(dsts, srcs, sizes, n, two, (c_size_t * 2)(0, 0), 2, s) == INVALID_VALUE
    ok(batch13(dsts, srcs, sizes, n, two, (c_size_t * 2)(0, 2), 2, s))
    srcs2[2] = d + 8000  # starts inside the allocation, does not fit
    assert batch128(dsts2, srcs2, sizes, n, attrs, idx, 1, byref(fail), s) == INVALID_VALUE and fail.value == 2
    assert batch128(dsts2, srcs2, sizes, n, attrs, idx, 1, byref(fail), None) == INVALID_VALUE
    assert fail.value == 2**64 - 1  # not tied to one copy
    ok(lib.cuStreamDestroy_v2(s))
    ok(lib.cuMemFree_v2(d))


def test_failure_injection(lib):
    s = stream(lib)
    assert lib.fakecuda_inject(b"cuStreamSynchronize", 999, 1, 2) == 0
    ok(lib.cuStreamSynchronize(s))  # skipped (a successful call)
    assert [lib.cuStreamSynchronize(s) for _ in range(3)] == [999, 999, SUCCESS]
    lib.fakecuda_inject(b"cuEventQuery", NOT_READY, 0, -1)
    assert lib.cuEventQuery(None) == NOT_READY  # checked before argument validation
    assert lib.cuEventQuery(None) == NOT_READY
    lib.fakecuda_reset()
    assert lib.cuEventQuery(None) == INVALID_HANDLE
    lib.fakecuda_inject(b"cuMemcpyBatchAsync_v2", 801, 0, 1)
    fn = c_void_p()
    ok(lib.cuGetProcAddress_v2(b"cuMemcpyBatchAsync", byref(fn), 13000, 0, None))
    assert BATCH_13(fn.value)(None, None, None, 0, None, None, 0, s) == 801
    assert lib.fakecuda_counter(b"no_such_counter") == -1
    ok(lib.cuStreamDestroy_v2(s))


def test_ipc_handle_errors_in_one_process(lib, so_path):
    d = alloc(lib, 4096)
    h = Handle64()
    ok(lib.cuIpcGetMemHandle(byref(h), d))
    p = c_ulonglong()
    assert lib.cuIpcOpenMemHandle_v2(byref(p), h, 0) == INVALID_CONTEXT  # own handle
    bad = Handle64.from_buffer_copy(b"XXXX" + bytes(h.reserved)[4:])
    assert lib.cuIpcOpenMemHandle_v2(byref(p), bad, 0) == INVALID_VALUE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    raw = bytearray(bytes(h.reserved))
    raw[4:8] = dead.pid.to_bytes(4, "little")
    assert lib.cuIpcOpenMemHandle_v2(byref(p), Handle64.from_buffer_copy(bytes(raw)), 0) == INVALID_HANDLE
    assert lib.cuIpcCloseMemHandle(d) == INVALID_VALUE  # own allocation, not an imported mapping
    ev = c_void_p()
    assert lib.cuIpcOpenEventHandle(byref(ev), bad) == INVALID_HANDLE
    ok(lib.cuMemFree_v2(d))


def test_ipc_memory_and_event_across_processes(lib, so_path):
    size = 1 << 20
    d = alloc(lib, size)
    base = pattern(4, size)
    write(lib, d, base)
    ev = event(lib, EVENT_DISABLE_TIMING | EVENT_INTERPROCESS)
    mh, eh = Handle64(), Handle64()
    ok(lib.cuIpcGetMemHandle(byref(mh), d))
    ok(lib.cuIpcGetEventHandle(byref(eh), ev))
    assert bytes(eh.reserved)[:4] == b"FCEV"
    # A slow copy on our stream, then the event: the child waits on the event before reading.
    s = stream(lib)
    head = pattern(5, 4096)
    host = ctypes.create_string_buffer(head, 4096)
    lib.fakecuda_set_copy_delay_us(300_000)
    ok(lib.cuMemcpyHtoDAsync_v2(d, host, 4096, s))
    ok(lib.cuEventRecord(ev, s))
    lib.fakecuda_set_copy_delay_us(0)
    child = run_child(so_path, "ipc", bytes(mh.reserved).hex(), bytes(eh.reserved).hex(), str(size),
                      stdin=subprocess.PIPE)
    try:
        r = json.loads(child.stdout.readline())
        assert r["same_pointer"] and r["range"] == [True, size]
        assert r["event_query_first"] in (SUCCESS, NOT_READY)
        assert bytes.fromhex(r["head"]) == head
        assert bytes.fromhex(r["tail"]) == base[-16:]
        assert r["ipc_opens"] == 1
        assert (r["close1"], r["close2"], r["open_mappings"]) == (SUCCESS, INVALID_VALUE, 0)
        assert read(lib, d + 8192, 16) == b"child wrote this"
        ok(lib.cuMemFree_v2(d))
        child.stdin.write("freed\n")
        child.stdin.flush()
        assert json.loads(child.stdout.readline()) == {"reopen_after_free": INVALID_HANDLE}
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
    ok(lib.cuStreamDestroy_v2(s))
    ok(lib.cuEventDestroy_v2(ev))


def test_concurrent_threads(lib):
    """Several threads, each with its own stream and allocation, copying at once."""
    errors = []
    ctx = c_void_p()
    ok(lib.cuCtxGetCurrent(byref(ctx)))

    def worker(k: int) -> None:
        try:
            ok(lib.cuCtxSetCurrent(ctx))
            d, s = alloc(lib, 1 << 15), stream(lib)
            data = pattern(k, 1 << 15)
            src = ctypes.create_string_buffer(data, len(data))
            out = ctypes.create_string_buffer(len(data))
            for _ in range(20):
                ok(lib.cuMemcpyHtoDAsync_v2(d, src, len(data), s))
                ok(lib.cuMemcpyDtoHAsync_v2(out, d, len(data), s))
            ok(lib.cuStreamSynchronize(s))
            assert out.raw == data
            ok(lib.cuStreamDestroy_v2(s))
            ok(lib.cuMemFree_v2(d))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    streams = counter(lib, "streams")
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and counter(lib, "streams") == streams
