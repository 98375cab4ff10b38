"""Engine memory for the hostile tests: KV buffers owned by this process, the victim's secret patterns and
tokens, and the geometry of the small KV cache every attack registers.

Imports only the standard library and :mod:`wire`: ``agent.py`` runs it from a world-readable copy under
another uid (see :func:`agents.agent_dir`)."""

from __future__ import annotations

import ctypes
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

from wire import p


def pattern(seed: Any, nbytes: int) -> bytes:
    """Reproducible pseudo-random bytes: a victim's secret or an attacker's own KV."""
    return random.Random(f"pattern/{seed}").randbytes(nbytes)


def tokens_for(seed: Any, count: int) -> List[int]:
    rng = random.Random(f"tokens/{seed}")
    return [rng.randrange(1000, 150000) for _ in range(count)]


def tb(tokens: Sequence[int]) -> bytes:
    return p.tokens_to_bytes(tokens)


def bb(block_ids: Sequence[int]) -> bytes:
    return p.block_ids_to_bytes(block_ids)


class HostBuffer:
    """KV memory of this process: a ctypes array whose address the sidecar may be told about."""

    def __init__(self, nbytes: int, seed: Any = None):
        self.nbytes = nbytes
        self.buf = (ctypes.c_ubyte * nbytes)()
        self.address = ctypes.addressof(self.buf)
        if seed is not None:
            self.write(0, pattern(seed, nbytes))

    def read(self, offset: int = 0, length: Optional[int] = None) -> bytes:
        length = self.nbytes - offset if length is None else length
        if offset < 0 or offset + length > self.nbytes:
            raise ValueError("read outside the buffer")
        return ctypes.string_at(self.address + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.nbytes:
            raise ValueError("write outside the buffer")
        ctypes.memmove(self.address + offset, data, len(data))

    def digest(self) -> str:
        return hashlib.sha256(self.read()).hexdigest()


PR_SET_PTRACER = 0x59616D61


def grant_ptrace(sidecar_pid: int) -> bool:
    """prctl(PR_SET_PTRACER, sidecar_pid) as an engine does; False where the kernel has no Yama (nothing to grant)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(sidecar_pid), 0, 0, 0) == 0


@dataclass(frozen=True)
class Geometry:
    """A small blocks-first NHD KV cache: ``num_layers`` regions of ``num_blocks`` blocks, back to back."""

    num_layers: int = 2
    num_blocks: int = 16
    block_tokens: int = 16
    chunk_tokens: int = 32
    num_heads: int = 2
    row_bytes: int = 64
    element_size: int = 2
    model_id: str = "hostile/tiny-model"
    kv_dtype: str = "float16"
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one layer (K and V)."""
        return 2 * self.block_tokens * self.num_heads * self.row_bytes

    @property
    def layer_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_tokens

    @property
    def chunk_bytes(self) -> int:
        return self.num_layers * self.blocks_per_chunk * self.block_bytes

    def layout(self) -> list:
        n, h, r = self.block_tokens, self.num_heads, self.row_bytes
        return p.layout(self.element_size, self.num_blocks, n, h, r, 2 * n * h * r, h * r, r, 0, n * h * r)

    def namespace(self, model_id: Optional[str] = None) -> list:
        return p.namespace(self.model_id if model_id is None else model_id, self.kv_dtype, self.block_tokens,
                           self.chunk_tokens, self.tp_size, self.tp_rank)

    def register_fields(self, pid: int, address: int, layer_refs: Optional[Sequence[Tuple[int, int]]] = None,
                        model_id: Optional[str] = None) -> list:
        """REGISTER of ``pid``'s memory at ``address``; ``layer_refs`` overrides (pid, address) per layer."""
        layers = []
        for i in range(self.num_layers):
            lp, la = layer_refs[i] if layer_refs else (pid, address + i * self.layer_bytes)
            layers.append([f"model.layers.{i}.attn", p.memory_ref_host(lp, la, self.layer_bytes), self.layout()])
        return p.register(self.namespace(model_id), layers)

    def blocks(self, first_chunk_block: int, chunks: int) -> List[int]:
        return list(range(first_chunk_block, first_chunk_block + chunks * self.blocks_per_chunk))

    def block_extents(self, blocks: Iterable[int]) -> List[Tuple[int, int]]:
        """(offset, length) of every given block in every layer: the bytes a LOAD into them writes."""
        return [(layer * self.layer_bytes + b * self.block_bytes, self.block_bytes)
                for layer in range(self.num_layers) for b in blocks]

    def tokens(self, seed: Any, chunks: int) -> List[int]:
        return tokens_for(seed, chunks * self.chunk_tokens)


GEOMETRY = Geometry()


def own_memory(seed: Any, geometry: Geometry = GEOMETRY) -> HostBuffer:
    """KV memory of this process (the attacker's own) for ``geometry``, filled with ``seed``'s pattern."""
    return HostBuffer(geometry.total_bytes, seed)


def samples_of(read: Callable[[int, int], bytes], geometry: Geometry, blocks: Iterable[int]) -> List[bytes]:
    """A 48-byte sample from the start of each given block in each layer: a victim's secret fingerprints."""
    return [read(off, 48) for off, _ in geometry.block_extents(blocks)]


def leaked(samples: Sequence[bytes], memory: bytes) -> int:
    """How many of a victim's secret samples occur in some other process's memory."""
    return sum(1 for s in samples if s in memory)
