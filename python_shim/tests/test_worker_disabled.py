"""A worker whose KV memory cannot be shared (e.g. a CUDA VMM allocation) runs uncached: its loads fail at once
and locally (the blocks are recomputed), its stores are not sent, and nothing reaches the sidecar."""

import struct

from csharp_kv import memory
from csharp_kv.config import ShimConfig
from csharp_kv.vllm.metadata import CSharpSidecarMetadata, LoadOp, StoreOp
from csharp_kv.vllm.worker import WorkerSide


def test_disabled_worker_fails_loads_locally_and_sends_nothing(tmp_path):
    cfg = ShimConfig.from_extra_config({"socket_path": str(tmp_path / "absent.sock"), "chunk_tokens": 32}, 16)
    w = WorkerSide(cfg, "engine", 0, 1, "m", memory.KvSpec(16, 2, 8), disabled_reason="VMM memory")
    try:
        tokens = struct.pack("<64I", *range(64))
        sync = LoadOp("sync", None, tokens, 0, 1, struct.pack("<2i", 3, 4), 0, False)
        late = LoadOp("async", None, tokens, 0, 1, struct.pack("<2i", -1, 7), 0, True)
        store = StoreOp("s", None, tokens, 0, 1, struct.pack("<2i", 5, 6))
        w.start_load_kv(CSharpSidecarMetadata(loads=[sync, late]))
        w.wait_for_save(CSharpSidecarMetadata(stores=[store]))
        assert w.get_block_ids_with_load_errors() == {3, 4}
        sending, recving = w.get_finished(set())
        assert recving == {"async"} and sending is None
        assert w.get_block_ids_with_load_errors() == {7}
        # The scheduler holds the stored request's blocks until its stores are reported done.
        sending, _ = w.get_finished({"s"})
        assert sending == {"s"}
        assert w.stats["loads"] == 0 and w.stats["stores"] == 0 and w.stats["load_errors"] == 2
    finally:
        w.shutdown()
