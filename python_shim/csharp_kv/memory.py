"""Describes an engine's KV tensors to the sidecar: where each layer's memory is and how its blocks
are laid out (byte strides of block, token and head; where K and V live). Nothing is allocated or
copied here: the sidecar reads and writes the tensors in place."""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from typing import Optional

from . import protocol as p

logger = logging.getLogger(__name__)

PR_SET_PTRACER = 0x59616D61


class UnsupportedLayout(ValueError):
    """A KV tensor whose layout this shim cannot describe (the request runs without the cache)."""


@dataclass(frozen=True)
class KvSpec:
    """What the KV cache spec says a layer holds."""

    block_size: int
    num_kv_heads: int
    head_size: int
    use_mla: bool = False


def describe_layout(t, spec: KvSpec) -> list:
    """The protocol Layout of one layer tensor, for every vLLM layout era (engines.md 3.1):

    - (2, B, N, H, D) kv-first; (B, 2, N, H, D) blocks-first (any stride order, so HND views work);
    - (B, H, N, 2D) packed K/V (K = [..., :D], V = [..., D:]); also the per-layer [B, H, N, C] views;
    - (B, N, C) MLA latent (no separate V).
    Offsets are bytes from the start of the tensor's storage."""
    e = t.element_size()
    shape, stride = tuple(t.shape), tuple(t.stride())
    base = t.storage_offset() * e
    n, h, d = spec.block_size, spec.num_kv_heads, spec.head_size
    if t.dim() == 5 and shape[0] == 2 and shape[2:] == (n, h, d) and stride[4] == 1:
        return p.layout(e, shape[1], n, h, d * e, stride[1] * e, stride[2] * e, stride[3] * e, base, base + stride[0] * e)
    if t.dim() == 5 and shape[1] == 2 and shape[2:] == (n, h, d) and stride[4] == 1:
        return p.layout(e, shape[0], n, h, d * e, stride[0] * e, stride[2] * e, stride[3] * e, base, base + stride[1] * e)
    if t.dim() == 4 and shape[1:] == (h, n, 2 * d) and stride[3] == 1:
        return p.layout(e, shape[0], n, h, d * e, stride[0] * e, stride[2] * e, stride[1] * e, base, base + d * e)
    if t.dim() == 3 and shape[1] == n and stride[2] == 1 and (spec.use_mla or h == 1):
        return p.layout(e, shape[0], n, 1, shape[2] * e, stride[0] * e, stride[1] * e, 0, base, -1)
    raise UnsupportedLayout(f"KV tensor of shape {shape} and strides {stride} does not match any known layout for "
                            f"block_size={n}, num_kv_heads={h}, head_size={d}")


def kv_dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def storage_extent(t) -> tuple:
    """(address, bytes) of the whole storage under a tensor (torch 2's untyped_storage, or 1.13's storage)."""
    if hasattr(t, "untyped_storage"):
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    storage = t.storage()
    return storage.data_ptr(), storage.size() * storage.element_size()


def export_host(t) -> list:
    """A CPU tensor's memory: this process, the storage's address and size."""
    address, nbytes = storage_extent(t)
    return p.memory_ref_host(os.getpid(), address, nbytes)


_libc = None


def grant_ptrace(sidecar_pid: Optional[int]) -> bool:
    """Lets the sidecar read and write this process's memory where Yama restricts ptrace
    (prctl PR_SET_PTRACER). Without Yama nothing is needed and the call is skipped."""
    global _libc
    if not os.path.exists("/proc/sys/kernel/yama/ptrace_scope"):
        return True
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read().strip() or "0")
    except (OSError, ValueError):
        scope = 1
    if scope == 0:
        return True
    if scope >= 2:
        logger.warning("kvsidecar: kernel.yama.ptrace_scope=%d forbids the sidecar to access engine memory unless it "
                       "has CAP_SYS_PTRACE (the systemd unit grants it)", scope)
    if not sidecar_pid:
        # Never PR_SET_PTRACER_ANY: that would let every process of this user read and write the KV cache.
        logger.warning("kvsidecar: the sidecar did not say its pid; not granting ptrace access (loads and stores "
                       "will fail and be recomputed)")
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(sidecar_pid), 0, 0, 0) != 0:
        logger.warning("kvsidecar: prctl(PR_SET_PTRACER) failed (errno %d)", ctypes.get_errno())
        return False
    return True


# ------------------------------------------------------------------------------------------- CUDA

CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
CU_EVENT_DISABLE_TIMING = 2
CU_EVENT_INTERPROCESS = 4
VMM_REFUSAL = ("the KV cache was allocated with the CUDA VMM API (cuMemCreate), which legacy CUDA IPC cannot share. "
               "vLLM does this with --enable-sleep-mode (its CuMemAllocator) and PyTorch with "
               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; turn that option off to use the sidecar")

_cuda = None


def cuda_driver():
    """The CUDA driver through ctypes: ``libcuda.so.1``, or the library ``KVSIDECAR_CUDA_LIBRARY`` names (the tests'
    driver double). Only what exporting needs is declared."""
    global _cuda
    if _cuda is None:
        lib = ctypes.CDLL(os.environ.get("KVSIDECAR_CUDA_LIBRARY") or "libcuda.so.1")
        u64, p64 = ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)
        lib.cuMemGetAddressRange_v2.argtypes = [p64, ctypes.POINTER(ctypes.c_size_t), u64]
        lib.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, u64]
        lib.cuIpcGetMemHandle.argtypes = [ctypes.c_void_p, u64]
        lib.cuEventCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cuIpcGetEventHandle.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        _cuda = lib
    return _cuda


def export_cuda(t, device_uuid: Optional[str] = None) -> list:
    """A CUDA tensor's memory: the IPC handle of its allocation's base (cuMemGetAddressRange), the offset into it and
    the device UUID (the sidecar finds the GPU by UUID, never by ordinal). VMM allocations are refused with the
    option that causes them."""
    ptr, nbytes = storage_extent(t)
    if device_uuid is None:
        import torch  # noqa: PLC0415 - only on GPU engines
        device_uuid = str(torch.cuda.get_device_properties(t.device).uuid)
    return export_cuda_pointer(ptr, nbytes, device_uuid)


def export_cuda_pointer(ptr: int, nbytes: int, device_uuid: str) -> list:
    cuda = cuda_driver()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    if cuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr) != 0:
        raise UnsupportedLayout(f"cuMemGetAddressRange failed for a KV tensor at 0x{ptr:x}: not CUDA device memory")
    capable = ctypes.c_int(1)
    if cuda.cuPointerGetAttribute(ctypes.byref(capable), CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                  base.value) == 0 and capable.value == 0:
        raise UnsupportedLayout(VMM_REFUSAL)
    handle = (ctypes.c_byte * 64)()
    if cuda.cuIpcGetMemHandle(ctypes.byref(handle), base.value) != 0:
        raise UnsupportedLayout("cuIpcGetMemHandle failed for the KV cache: " + VMM_REFUSAL)
    # pid 0: "the connecting process"; the sidecar binds the memory to our connection's kernel-reported identity.
    return p.memory_ref_cuda(bytes(handle), device_uuid, ptr - base.value, nbytes, 0)


class StoreEvent:
    """An interprocess CUDA event the worker records after each forward pass, before it sends that step's stores:
    the sidecar's store stream waits on it, so a store never reads KV the forward is still writing, and the engine
    never waits for the copy."""

    def __init__(self):
        cuda = cuda_driver()
        self._event = ctypes.c_void_p()
        rc = cuda.cuEventCreate(ctypes.byref(self._event), CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS)
        if rc != 0:
            raise UnsupportedLayout(f"cuEventCreate(INTERPROCESS) failed ({rc})")
        handle = (ctypes.c_byte * 64)()
        rc = cuda.cuIpcGetEventHandle(ctypes.byref(handle), self._event)
        if rc != 0:
            raise UnsupportedLayout(f"cuIpcGetEventHandle failed ({rc})")
        self.handle = bytes(handle)

    def record(self, stream: Optional[int] = None) -> None:
        """Records on ``stream`` (a CUstream handle), by default torch's current stream."""
        if stream is None:
            import torch  # noqa: PLC0415 - only on GPU engines
            stream = torch.cuda.current_stream().cuda_stream
        rc = cuda_driver().cuEventRecord(self._event, stream)
        if rc != 0:
            raise RuntimeError(f"cuEventRecord failed ({rc})")
