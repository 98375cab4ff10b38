"""Worker-role half of the connector: registers the KV tensors once (again after a reconnect), runs
the step's loads and stores as one request each, and reports finished and failed loads."""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Set, Tuple

from .. import memory
from .. import protocol as p
from ..client import Reply, SidecarClient
from ..config import ShimConfig
from .metadata import CSharpSidecarMetadata, LoadOp

logger = logging.getLogger(__name__)


class WorkerSide:
    def __init__(self, cfg: ShimConfig, instance_id: str, rank: int, tp_size: int, model_id: str,
                 spec: Optional[memory.KvSpec], engine_version: str = "", disabled_reason: Optional[str] = None):
        self.cfg = cfg
        self.rank = rank
        self.tp_size = tp_size
        self.model_id = cfg.model_id or model_id
        self.spec = spec
        self.bpc = cfg.chunk_tokens // spec.block_size if spec else 0
        self.disabled_reason = disabled_reason
        self.registered = False
        self._register_fields: Optional[list] = None
        self._async: Dict[str, Tuple[object, LoadOp, float]] = {}
        self._errors: Set[int] = set()
        self._finished_recving: Set[str] = set()
        self.stats = {"registrations": 0, "loads": 0, "loaded_chunks": 0, "load_errors": 0, "failed_blocks": 0,
                      "stores": 0, "stored_chunks": 0, "store_errors": 0, "transfer_timeouts": 0,
                      "load_wait_seconds": 0.0, "store_wait_seconds": 0.0}
        self.client = SidecarClient(cfg.socket_path, instance_id, "worker", rank, engine_version=engine_version,
                                    connect_timeout=cfg.connect_timeout_ms / 1000,
                                    retry_interval=cfg.retry_interval_ms / 1000, on_connect=self._on_connect)

    # --------------------------------------------------------------- registration

    def register_kv_caches(self, kv_caches) -> None:
        if self.disabled_reason:
            logger.warning("kvsidecar: the KV cache is off for this engine: %s", self.disabled_reason)
            return
        layers = []
        dtype = None
        try:
            for name, t in kv_caches.items():
                layout = memory.describe_layout(t, self.spec)
                ref = memory.export_host(t) if t.device.type == "cpu" else memory.export_cuda(t)
                layers.append([name, ref, layout])
                dtype = dtype or memory.kv_dtype_name(t)
        except memory.UnsupportedLayout as e:
            self.disabled_reason = str(e)
            logger.warning("kvsidecar: the KV cache is off for this engine: %s", e)
            return
        tp_rank = -1 if self.spec.use_mla else self.rank
        ns = p.namespace(self.model_id, self.cfg.kv_dtype or dtype or "auto", self.spec.block_size,
                         self.cfg.chunk_tokens, self.tp_size, tp_rank)
        self._register_fields = p.register(ns, layers)
        if not self.client.ensure_connected(force=True):
            return  # on_connect registers when the sidecar appears

    def _on_connect(self, client: SidecarClient) -> None:
        self.registered = False
        if self._register_fields is None:
            return
        memory.grant_ptrace(client.server_pid)
        reply = client.call(p.Opcode.REGISTER, self._register_fields, timeout=self.cfg.transfer_timeout_ms / 1000)
        if reply.ok:
            self.registered = True
            self.stats["registrations"] += 1
            logger.info("kvsidecar: rank %d registered %d KV layers (chunk %s bytes, layout %s)", self.rank,
                        len(self._register_fields[1]), reply.get(2), reply.get(1))
        else:
            logger.warning("kvsidecar: the sidecar refused the KV memory of rank %d: %s (code %d); running without "
                           "the cache", self.rank, reply.error, reply.error_code)

    # --------------------------------------------------------------- loads

    def start_load_kv(self, meta: Optional[CSharpSidecarMetadata]) -> None:
        if meta is None or not meta.loads:
            return
        sync: List[Tuple[object, LoadOp]] = []
        now_ns = time.monotonic_ns()
        now = now_ns / 1e9
        # The sidecar writes nothing into our blocks after the moment we stop waiting (CLOCK_MONOTONIC, shared).
        deadline_ns = now_ns + int(self.cfg.transfer_timeout_ms * 1_000_000)
        for op in meta.loads:
            if op.req_id in self._async:
                continue  # already running (MR V2 may call start_load_kv twice in a step)
            fut = self.client.submit(p.Opcode.LOAD, p.load(op.req_id, op.cache_salt, op.tokens, op.first_chunk,
                                                           op.num_chunks, op.block_ids, op.lease_id, deadline_ns))
            self.stats["loads"] += 1
            if op.is_async:
                self._async[op.req_id] = (fut, op, now)
            else:
                sync.append((fut, op))
        deadline = now + self.cfg.transfer_timeout_ms / 1000
        for fut, op in sync:
            self._finish_load(self.client.wait(fut, max(0.0, deadline - time.monotonic())), op)
        self.stats["load_wait_seconds"] += time.monotonic() - now

    def _finish_load(self, reply: Reply, op: LoadOp) -> None:
        loaded = int(reply.get(0, 0)) if reply.ok else 0
        self.stats["loaded_chunks"] += loaded
        if loaded >= op.num_chunks:
            return
        # Blocks of the chunks not loaded hold garbage: vLLM recomputes them.
        ids = memoryview(op.block_ids).cast("i")
        failed = {b for b in ids[loaded * self.bpc:] if b >= 0}
        self._errors |= failed
        self.stats["load_errors"] += 1
        self.stats["failed_blocks"] += len(failed)
        if not reply.ok:
            logger.warning("kvsidecar: load of %s failed (%s); %d blocks will be recomputed", op.req_id, reply.error,
                           len(failed))

    def get_finished(self, finished_req_ids) -> Tuple[Optional[Set[str]], Optional[Set[str]]]:
        now = time.monotonic()
        limit = self.cfg.transfer_timeout_ms / 1000
        for req_id, (fut, op, started) in list(self._async.items()):
            if fut.done():
                self._finish_load(fut.result(), op)
            elif now - started > limit:
                self.stats["transfer_timeouts"] += 1
                self._finish_load(Reply(error_code=-1, error="timed out"), op)
            else:
                continue
            del self._async[req_id]
            self._finished_recving.add(req_id)
        done, self._finished_recving = self._finished_recving, set()
        return None, (done or None)

    def get_block_ids_with_load_errors(self) -> Set[int]:
        errors, self._errors = self._errors, set()
        return errors

    # --------------------------------------------------------------- stores

    def wait_for_save(self, meta: Optional[CSharpSidecarMetadata]) -> None:
        """Stores this step's newly full chunks; returns when the sidecar has copied them out, so the
        blocks may be reused at once. Failures are dropped (the chunks are simply not cached)."""
        if meta is None or not meta.stores:
            return
        started_ns = time.monotonic_ns()
        started = started_ns / 1e9
        # The sidecar commits nothing it copied after we stop waiting (CLOCK_MONOTONIC, shared): we reuse the blocks then.
        deadline_ms = int(self.cfg.transfer_timeout_ms)
        deadline_ns = started_ns + deadline_ms * 1_000_000
        futs = [(self.client.submit(p.Opcode.STORE, p.store(op.req_id, op.cache_salt, op.tokens, op.first_chunk,
                                                            op.num_chunks, op.block_ids, deadline_ms, deadline_ns)), op)
                for op in meta.stores]
        deadline = deadline_ns / 1e9
        for fut, op in futs:
            reply = self.client.wait(fut, max(0.0, deadline - time.monotonic()))
            self.stats["stores"] += 1
            if reply.ok:
                self.stats["stored_chunks"] += int(reply.get(0, 0))
            else:
                self.stats["store_errors"] += 1
                logger.debug("kvsidecar: store of %s dropped: %s", op.req_id, reply.error)
        self.stats["store_wait_seconds"] += time.monotonic() - started

    def shutdown(self) -> None:
        self.client.close()
