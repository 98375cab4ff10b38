"""Worker-role half of the connector: registers the KV tensors once (again after a reconnect), runs
the step's loads and stores as one request each, and reports finished and failed loads."""

from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Set, Tuple

from .. import memory
from .. import protocol as p
from ..client import Reply, SidecarClient
from ..config import ShimConfig
from .metadata import CSharpSidecarMetadata, LoadOp, StoreOp

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
        self._store_event: Optional[memory.StoreEvent] = None
        self._async: Dict[str, Tuple[object, LoadOp, float]] = {}
        self._errors: Set[int] = set()
        self._failed_async: Dict[str, Set[int]] = {}
        self._finished_recving: Set[str] = set()
        self._stores: Dict[str, _PendingStores] = {}
        self._in_flight: Set[str] = set()      # requests with stores not yet answered
        self._done_sending: Set[str] = set()   # finished requests whose stores are all answered
        self.stats = {"registrations": 0, "loads": 0, "loaded_chunks": 0, "load_errors": 0, "failed_blocks": 0,
                      "stores": 0, "stored_chunks": 0, "store_errors": 0, "transfer_timeouts": 0,
                      "load_wait_seconds": 0.0, "store_submit_seconds": 0.0, "store_token_bytes": 0}
        self.client = SidecarClient(cfg.socket_path, instance_id, "worker", rank, engine_version=engine_version,
                                    connect_timeout=cfg.connect_timeout_ms / 1000,
                                    retry_interval=cfg.retry_interval_ms / 1000, on_connect=self._on_connect,
                                    send_timeout=cfg.send_timeout_ms / 1000)

    # --------------------------------------------------------------- registration

    def register_kv_caches(self, kv_caches) -> None:
        if self.disabled_reason:
            logger.warning("kvsidecar: the KV cache is off for this engine: %s", self.disabled_reason)
            return
        layers = []
        dtype = None
        # Test hook: the CUDA driver double's device memory is host memory, so its KV tensors are CPU tensors.
        fake_cuda_uuid = os.environ.get("KVSIDECAR_FAKE_CUDA_DEVICE")
        try:
            cuda = False
            for name, t in kv_caches.items():
                layout = memory.describe_layout(t, self.spec)
                if t.device.type == "cuda" or fake_cuda_uuid:
                    ref = memory.export_cuda(t, fake_cuda_uuid)
                    cuda = True
                else:
                    ref = memory.export_host(t)
                layers.append([name, ref, layout])
                dtype = dtype or memory.kv_dtype_name(t)
            if cuda and self._store_event is None:
                self._store_event = memory.StoreEvent()
        except memory.UnsupportedLayout as e:
            self.disabled_reason = str(e)
            logger.warning("kvsidecar: the KV cache is off for this engine: %s", e)
            return
        tp_rank = -1 if self.spec.use_mla else self.rank
        ns = p.namespace(self.model_id, self.cfg.kv_dtype or dtype or "auto", self.spec.block_size,
                         self.cfg.chunk_tokens, self.tp_size, tp_rank)
        self._register_fields = p.register(ns, layers, self._store_event.handle if self._store_event else None)
        # Start-up may wait for the first connection (on_connect registers); if the sidecar is absent the
        # background connect keeps trying and registers when it appears.
        self.client.ensure_connected(wait=self.cfg.connect_timeout_ms / 1000)

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
        # Every step: reconnects start within a retry interval of the sidecar's return (in the background).
        self.client.ensure_connected()
        if meta is None or not meta.loads:
            return
        if self.disabled_reason:
            # The cache is off for this worker (its KV memory cannot be shared): every load fails here, at once,
            # without a request the sidecar would refuse.
            for op in meta.loads:
                if op.req_id in self._async:
                    continue
                self._finish_load(Reply(error_code=-1, error=self.disabled_reason), op)
                if op.is_async:
                    self._finished_recving.add(op.req_id)
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
        if op.is_async:
            self._failed_async[op.req_id] = failed
        else:
            self._errors |= failed
        self.stats["load_errors"] += 1
        self.stats["failed_blocks"] += len(failed)
        if not reply.ok:
            logger.warning("kvsidecar: load of %s failed (%s); %d blocks will be recomputed", op.req_id, reply.error,
                           len(failed))

    def _poll_async_loads(self) -> None:
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

    def get_finished(self, finished_req_ids) -> Tuple[Optional[Set[str]], Optional[Set[str]]]:
        """vLLM up to about v0.29: failed asynchronous loads are reported as finished plus their failed blocks."""
        sending = self._finished_sending(finished_req_ids)
        self._poll_async_loads()
        for blocks in self._failed_async.values():
            self._errors |= blocks
        self._failed_async.clear()
        done, self._finished_recving = self._finished_recving, set()
        return (sending or None), (done or None)

    def get_transfer_results(self, finished_req_ids):
        """Newest vLLM: a failed asynchronous load is reported per request (``failed_recving``, and also in
        ``finished_recving`` so the request leaves its wait state), not as block ids."""
        from .._vllm_api import KVConnectorTransferResults  # noqa: PLC0415 - exists only in newest vLLM

        sending = self._finished_sending(finished_req_ids)
        self._poll_async_loads()
        failed = set(self._failed_async)
        self._failed_async.clear()
        done, self._finished_recving = self._finished_recving, set()
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=done, failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> Set[int]:
        errors, self._errors = self._errors, set()
        return errors

    # --------------------------------------------------------------- stores

    def wait_for_save(self, meta: Optional[CSharpSidecarMetadata]) -> None:
        """Submits this step's stores and returns at once: the forward never waits for a copy. A request that
        stored keeps its blocks (the scheduler side delays their free) until :meth:`_finished_sending` reports
        its stores done; the sidecar commits nothing it copied after the deadline sent with each store."""
        self.client.ensure_connected()
        # Replies first: a store resumes from the newest chain state we hold.
        self._reap_stores()
        if meta is None or not meta.stores:
            return
        if self.disabled_reason:
            # Nothing is sent, but the requests are known: each is reported in finished_sending when vLLM finishes
            # it, so the blocks the scheduler held back for its stores are freed.
            for op in meta.stores:
                self._stores.setdefault(op.req_id, _PendingStores())
            return
        if self._store_event is not None:
            # After this step's forward on the compute stream: the sidecar's store copies wait for it on the GPU.
            self._store_event.record(self._event_stream())
        started_ns = time.monotonic_ns()
        deadline_ns = started_ns + int(self.cfg.transfer_timeout_ms * 1_000_000)
        for op in meta.stores:
            self._submit_store(op, deadline_ns)
        self.stats["store_submit_seconds"] += (time.monotonic_ns() - started_ns) / 1e9

    @staticmethod
    def _event_stream() -> Optional[int]:
        """torch's current CUDA stream; 0 (the default stream) where the KV is not on a torch GPU (the driver double)."""
        if os.environ.get("KVSIDECAR_FAKE_CUDA_DEVICE"):
            return 0
        return None

    def _submit_store(self, op: StoreOp, deadline_ns: int) -> None:
        pending = self._stores.setdefault(op.req_id, _PendingStores())
        chunk_bytes = self.cfg.chunk_tokens * 4
        if op.tokens_from_chunk == 0:
            pending.tokens = bytearray(op.tokens)
        elif len(pending.tokens) == op.tokens_from_chunk * chunk_bytes:
            pending.tokens += op.tokens
        else:
            # We missed the start of this request's token history (we were not running then): skip it.
            self.stats["store_errors"] += 1
            return
        end = (op.first_chunk + op.num_chunks) * chunk_bytes
        chain = pending.chain if pending.chain is not None and p.chain_chunk(pending.chain) < op.first_chunk else None
        # Resume the sidecar's key chain where the last reply left it: only the new chunks' tokens go out.
        start = (p.chain_chunk(chain) + 1) * chunk_bytes if chain is not None else 0
        tokens = bytes(pending.tokens[start:end])
        # A store may wait for a reconnection under way: it goes out once the memory is registered again.
        fut = self.client.submit(p.Opcode.STORE, p.store(op.req_id, op.cache_salt, tokens, op.first_chunk,
                                                         op.num_chunks, op.block_ids,
                                                         int(self.cfg.transfer_timeout_ms), deadline_ns, chain),
                                 queue=True)
        pending.futures.append((fut, deadline_ns))
        self._in_flight.add(op.req_id)
        self.stats["stores"] += 1
        self.stats["store_token_bytes"] += len(tokens)

    def _reap_stores(self) -> None:
        """Counts stores that completed; a store past its deadline counts as failed (nothing of it is committed)."""
        if not self._in_flight:
            return
        now_ns = time.monotonic_ns()
        for req_id in list(self._in_flight):
            pending = self._stores[req_id]
            keep = []
            for fut, deadline_ns in pending.futures:
                if fut.done():
                    reply = fut.result()
                    if reply.ok:
                        self.stats["stored_chunks"] += int(reply.get(0, 0))
                        chain = reply.get(3)
                        if chain and (pending.chain is None or p.chain_chunk(chain) > p.chain_chunk(pending.chain)):
                            pending.chain = bytes(chain)
                    else:
                        # A sidecar that restarted no longer knows our chain state: the next store sends the prefix.
                        pending.chain = None
                        self.stats["store_errors"] += 1
                        logger.debug("kvsidecar: a store was dropped: %s", reply.error)
                elif now_ns > deadline_ns:
                    self.stats["store_errors"] += 1
                    self.stats["transfer_timeouts"] += 1
                else:
                    keep.append((fut, deadline_ns))
            pending.futures = keep
            if not keep:
                self._in_flight.discard(req_id)
                if pending.finished:
                    self._done_sending.add(req_id)

    def _finished_sending(self, finished_req_ids) -> Set[str]:
        """Requests vLLM finished whose stores are all done (or failed): their blocks may be freed now."""
        for req_id in finished_req_ids or ():
            pending = self._stores.get(req_id)
            if pending is not None:
                pending.finished = True
                if not pending.futures:
                    self._done_sending.add(req_id)
        self._reap_stores()
        done, self._done_sending = self._done_sending, set()
        for req_id in done:
            self._stores.pop(req_id, None)
        return done

    def wait_for_stores_of(self, req_ids) -> None:
        """Blocks until the stores of preempted requests are done or past their deadline: vLLM frees a
        preempted request's blocks at once, so no copy may still be reading them when the next forward runs."""
        for req_id in req_ids:
            pending = self._stores.get(req_id)
            if pending is None:
                continue
            for fut, deadline_ns in pending.futures:
                left = (deadline_ns - time.monotonic_ns()) / 1e9
                if left > 0:
                    self.client.wait(fut, left)
            self._reap_stores()

    def shutdown(self) -> None:
        self.client.close()


class _PendingStores:
    """One request's stores in flight, the token history they need, and whether vLLM finished the request."""

    __slots__ = ("futures", "tokens", "finished", "chain")

    def __init__(self):
        self.futures: List[Tuple[object, int]] = []
        self.tokens = bytearray()
        self.finished = False
        self.chain: Optional[bytes] = None
