"""The "model": deterministic KV for every computed token, and the tensor layouts of each vLLM era."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

ERAS = ("kv_first", "blocks_first", "packed", "shared_views")


@dataclass(frozen=True)
class Geometry:
    num_layers: int = 4
    num_blocks: int = 64
    block_size: int = 16
    num_heads: int = 2
    head_size: int = 8
    dtype: torch.dtype = torch.float16


def kv_values(tokens: torch.Tensor, positions: torch.Tensor, layer: int, plane: int, rank: int, g: Geometry) -> torch.Tensor:
    """[T, H, D] values that depend only on (token, position, layer, K/V, rank, head, dim): exact in fp16/bf16."""
    t = tokens.view(-1, 1, 1).to(torch.int64)
    p = positions.view(-1, 1, 1).to(torch.int64)
    h = torch.arange(g.num_heads).view(1, -1, 1)
    d = torch.arange(g.head_size).view(1, 1, -1)
    v = (t * 31 + p * 7 + layer * 13 + plane * 3 + rank * 5 + h * 11 + d) % 127
    return (v.to(torch.float32) / 4.0).to(g.dtype)


_cuda_double = None
FAKE_GPU_UUID = "GPU-facecda0-0000-0000-0000-000000000000"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_cuda_double() -> str:
    """Builds the CUDA driver double (once; build.sh skips an up-to-date library) and returns its path."""
    import subprocess

    out = subprocess.run(["bash", os.path.join(REPO, "tests", "cuda_double", "build.sh")], check=True,
                         capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def remove_device_memory(pids) -> None:
    """A killed process (or one that exits without its atexit handlers) leaves the double's "device memory", POSIX
    shared memory named after its pid: unlink it for it."""
    import glob

    for pid in pids:
        for pattern in (f"fakecuda-{pid}-*", f"fakecuda-ev-{pid}-*"):
            for path in glob.glob(os.path.join("/dev/shm", pattern)):
                os.unlink(path)


def use_cuda_double(library: str) -> None:
    """Makes this worker a "GPU" engine over the CUDA driver double: its KV tensors are views of the double's
    device memory (host memory shared through /dev/shm), and the shim exports them with CUDA IPC handles."""
    global _cuda_double
    import ctypes

    os.environ["KVSIDECAR_CUDA_LIBRARY"] = library
    os.environ["KVSIDECAR_FAKE_CUDA_DEVICE"] = FAKE_GPU_UUID
    lib = ctypes.CDLL(library)
    lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    ctx = ctypes.c_void_p()
    for rc in (lib.cuInit(0), lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0), lib.cuCtxSetCurrent(ctx)):
        if rc != 0:
            raise RuntimeError(f"the CUDA driver double failed to start ({rc})")
    _cuda_double = lib


def _zeros(*shape, dtype) -> torch.Tensor:
    """torch.zeros on the host, or in the driver double's device memory when this worker uses it."""
    if _cuda_double is None:
        return torch.zeros(*shape, dtype=dtype)
    import ctypes

    n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    ptr = ctypes.c_uint64()
    if _cuda_double.cuMemAlloc_v2(ctypes.byref(ptr), n) != 0:
        raise RuntimeError("cuMemAlloc_v2 failed in the CUDA driver double")
    raw = torch.frombuffer((ctypes.c_uint8 * n).from_address(ptr.value), dtype=torch.uint8)
    return raw.view(dtype).view(*shape).zero_()


def make_kv_caches(era: str, g: Geometry) -> dict:
    """One tensor per layer, in the shape vLLM passed to register_kv_caches in that era."""
    B, N, H, D = g.num_blocks, g.block_size, g.num_heads, g.head_size
    caches = {}
    if era == "shared_views":
        # One buffer for all layers ([B, L, H, N, 2D]); each layer gets a strided [B, H, N, 2D] view (#51718).
        buf = _zeros(B, g.num_layers, H, N, 2 * D, dtype=g.dtype)
        for layer in range(g.num_layers):
            caches[f"model.layers.{layer}.self_attn.attn"] = buf[:, layer]
        return caches
    for layer in range(g.num_layers):
        if era == "kv_first":
            t = _zeros(2, B, N, H, D, dtype=g.dtype)
        elif era == "blocks_first":
            t = _zeros(B, 2, N, H, D, dtype=g.dtype)
        elif era == "packed":
            t = _zeros(B, H, N, 2 * D, dtype=g.dtype)
        else:
            raise ValueError(era)
        caches[f"model.layers.{layer}.self_attn.attn"] = t
    return caches


def kv_views(t: torch.Tensor, era: str, g: Geometry):
    """K and V of a layer tensor as [B, N, H, D] views."""
    if era == "kv_first":
        return t[0], t[1]
    if era == "blocks_first":
        return t[:, 0], t[:, 1]
    d = g.head_size
    return t[..., :d].transpose(1, 2), t[..., d:].transpose(1, 2)


def fill_blocks(kv_caches: dict, era: str, g: Geometry, block_ids, value: float) -> None:
    """Every slot of these blocks, K and V of every layer, set to ``value`` (zeroing, or the harness's poison)."""
    idx = torch.tensor(list(block_ids), dtype=torch.long)
    for t in kv_caches.values():
        k, v = kv_views(t, era, g)
        k[idx] = value
        v[idx] = value


def copy_blocks(kv_caches: dict, era: str, g: Geometry, pairs) -> None:
    """Block copies ``(src, dst)`` inside the KV cache, every layer."""
    src = torch.tensor([s for s, _ in pairs], dtype=torch.long)
    dst = torch.tensor([d for _, d in pairs], dtype=torch.long)
    for t in kv_caches.values():
        k, v = kv_views(t, era, g)
        k[dst] = k[src]
        v[dst] = v[src]


def make_copy_blocks_op(era: str, g: Geometry):
    """What the worker hands to ``set_host_xfer_buffer_ops``: vLLM's ``copy_kv_blocks(src_kv_caches,
    dst_kv_caches, src_block_ids, dst_block_ids, direction)`` for tensors of this era."""

    def copy_kv_blocks(src_kv_caches: dict, dst_kv_caches: dict, src_block_ids, dst_block_ids, direction) -> None:
        src = torch.tensor(list(src_block_ids), dtype=torch.long)
        dst = torch.tensor(list(dst_block_ids), dtype=torch.long)
        for name, s in src_kv_caches.items():
            sk, sv = kv_views(s, era, g)
            dk, dv = kv_views(dst_kv_caches[name], era, g)
            dk[dst] = sk[src].to(dk.device)
            dv[dst] = sv[src].to(dv.device)

    return copy_kv_blocks
