"""A stand-in GPU engine process for the C# data-plane tests: it allocates "device" memory from the CUDA driver
double, exports IPC handles and events, and fills or hashes its memory on request.

Protocol: one command per line on stdin, one answer line on stdout ("err ..." on failure). Started as
``python3 exporter.py LIBCUDA_DOUBLE``; answers "ready PID" first.

  alloc N                               -> "PTR HANDLE_HEX"   (cuMemAlloc + cuIpcGetMemHandle)
  fill PTR OFFSET LEN SEED              -> "ok"               (deterministic bytes from SEED)
  hash PTR OFFSET LEN                   -> SHA-256 hex of the bytes
  free PTR                              -> "ok"
  event                                 -> "HANDLE_HEX"       (an interprocess event)
  write_after DELAY_US PTR OFFSET LEN SEED -> "ok"            (queues a delayed write on a stream, then records the event)
  sync                                  -> "ok"               (waits for that stream)
"""

import ctypes
import hashlib
import os
import random
import sys


def main(lib_path):
    cuda = ctypes.CDLL(lib_path)
    u64 = ctypes.c_uint64
    cuda.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), ctypes.c_size_t]
    cuda.cuMemFree_v2.argtypes = [u64]
    cuda.cuIpcGetMemHandle.argtypes = [ctypes.c_void_p, u64]
    cuda.cuMemcpyHtoDAsync_v2.argtypes = [u64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    cuda.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    cuda.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
    check(cuda.cuInit(0), "cuInit")
    ctx = ctypes.c_void_p()
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    stream = ctypes.c_void_p()
    check(cuda.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")
    event = ctypes.c_void_p()
    staged = []
    print(f"ready {os.getpid()}", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        try:
            cmd, args = parts[0], [int(a) for a in parts[1:]]
            if cmd == "alloc":
                ptr = u64()
                check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), args[0]), "cuMemAlloc_v2")
                handle = (ctypes.c_byte * 64)()
                check(cuda.cuIpcGetMemHandle(ctypes.byref(handle), ptr.value), "cuIpcGetMemHandle")
                answer = f"{ptr.value} {bytes(handle).hex()}"
            elif cmd == "fill":
                ptr, offset, length, seed = args
                ctypes.memmove(ptr + offset, pattern(length, seed), length)
                answer = "ok"
            elif cmd == "hash":
                ptr, offset, length = args
                answer = hashlib.sha256(ctypes.string_at(ptr + offset, length)).hexdigest()
            elif cmd == "free":
                check(cuda.cuMemFree_v2(args[0]), "cuMemFree_v2")
                answer = "ok"
            elif cmd == "event":
                check(cuda.cuEventCreate(ctypes.byref(event), 2 | 4), "cuEventCreate")
                handle = (ctypes.c_byte * 64)()
                check(cuda.cuIpcGetEventHandle(ctypes.byref(handle), event), "cuIpcGetEventHandle")
                answer = bytes(handle).hex()
            elif cmd == "write_after":
                delay, ptr, offset, length, seed = args
                cuda.fakecuda_set_copy_delay_us(delay)
                data = ctypes.create_string_buffer(pattern(length, seed), length)
                staged.append(data)  # alive until the stream ran the copy
                check(cuda.cuMemcpyHtoDAsync_v2(ptr + offset, data, length, stream), "cuMemcpyHtoDAsync_v2")
                check(cuda.cuEventRecord(event, stream), "cuEventRecord")
                answer = "ok"
            elif cmd == "sync":
                check(cuda.cuStreamSynchronize(stream), "cuStreamSynchronize")
                cuda.fakecuda_set_copy_delay_us(0)
                staged.clear()
                answer = "ok"
            else:
                answer = f"err unknown command {cmd}"
        except Exception as e:  # noqa: BLE001 - every failure is an answer
            answer = f"err {e}"
        print(answer, flush=True)


def pattern(length, seed):
    return random.Random(seed).randbytes(length)


def check(rc, what):
    if rc != 0:
        raise RuntimeError(f"{what} failed ({rc})")


if __name__ == "__main__":
    main(sys.argv[1])
