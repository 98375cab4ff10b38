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


def export_cuda(t) -> list:
    """A CUDA tensor's memory: the IPC handle of its allocation base (cuMemGetAddressRange), the offset
    into it, and the device UUID. VMM / expandable-segment allocations cannot be exported this way."""
    import torch  # noqa: PLC0415 - only on GPU engines

    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").find("expandable_segments:True") >= 0:
        raise UnsupportedLayout("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True allocates with the VMM API, whose "
                                "memory cannot be shared through cudaIpcGetMemHandle; unset it to use the sidecar")
    cuda = ctypes.CDLL("libcuda.so.1")
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    ptr, nbytes = storage_extent(t)
    if cuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)) != 0:
        raise UnsupportedLayout("cuMemGetAddressRange failed for a KV tensor")
    handle = (ctypes.c_byte * 64)()
    if cuda.cuIpcGetMemHandle(ctypes.byref(handle), ctypes.c_uint64(base.value)) != 0:
        raise UnsupportedLayout("cuIpcGetMemHandle failed: the KV cache was not allocated with cudaMalloc "
                                "(VMM or expandable segments?)")
    uuid = str(torch.cuda.get_device_properties(t.device).uuid)
    return p.memory_ref_cuda(bytes(handle), uuid, ptr - base.value, nbytes, os.getpid())
