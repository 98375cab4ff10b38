"""Scheduler-role half of the connector: lookups that never block the scheduler beyond a per-step budget,
load and store planning, lease hygiene, load-failure memory, and the per-step metadata."""

from __future__ import annotations

import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Dict, List, Optional, Set, Tuple

from .. import protocol as p
from ..client import SidecarClient
from ..config import ShimConfig
from .metadata import CSharpSidecarMetadata, LoadOp, StoreOp

logger = logging.getLogger(__name__)


class _Req:
    """What the scheduler side remembers about one request."""

    __slots__ = ("request", "lookup_fut", "lookup_key", "lookup_started", "pending_since", "answer", "lease_id", "n_local",
                 "load_op", "load_blocks", "load_failed", "block_ids", "stored_chunks", "num_computed",
                 "stores_planned")

    def __init__(self, request):
        self.request = request
        self.lookup_fut = None
        self.lookup_key: Optional[Tuple[int, int]] = None
        self.lookup_started = 0.0
        self.pending_since = 0.0  # when the sidecar first answered "pending" (promoting from lower tiers)
        self.answer: Optional[Tuple[int, bool]] = None
        self.lease_id = 0
        self.n_local = 0
        self.load_op: Optional[LoadOp] = None
        self.load_blocks: Set[int] = set()
        self.load_failed = False
        self.block_ids: List[int] = []
        self.stored_chunks = 0
        self.num_computed = 0
        self.stores_planned = 0


class SchedulerSide:
    """The scheduler side.

    Lookups are sent as early as vLLM shows a request (``on_new_request``), so they are answered together
    while the scheduler works; in a step the scheduler waits for answers at most ``lookup_wait_ms`` in total,
    then says "not yet". A request whose load failed is never offered a hit again (vLLM would otherwise
    reset it and ask again with the same arguments, forever). A lease taken for a hit that vLLM did not admit
    in the step is released at once, and the lookup is sent again for the next step."""

    def __init__(self, cfg: ShimConfig, instance_id: str, block_size: int, engine_version: str = ""):
        self.cfg = cfg
        self.block_size = block_size
        self.chunk = cfg.chunk_tokens
        self.bpc = cfg.chunk_tokens // block_size
        self.client = SidecarClient(cfg.socket_path, instance_id, "scheduler", 0, engine_version=engine_version,
                                    connect_timeout=cfg.connect_timeout_ms / 1000,
                                    retry_interval=cfg.retry_interval_ms / 1000,
                                    send_timeout=cfg.send_timeout_ms / 1000)
        # Start-up may wait for the first connection; a scheduler step never does.
        self.client.ensure_connected(wait=cfg.connect_timeout_ms / 1000)
        self.reqs: Dict[str, _Req] = {}
        self._loads: List[_Req] = []
        self._answered: List[_Req] = []
        self._step_deadline: Optional[float] = None
        self.stats = {"lookups": 0, "lookup_not_yet": 0, "lookup_hit_tokens": 0, "lookup_misses": 0,
                      "lookup_errors": 0, "lookup_timeouts": 0, "loads_planned": 0, "stores_planned": 0,
                      "skipped_requests": 0, "failed_loads": 0, "hits_refused_after_failure": 0,
                      "leases_released_unadmitted": 0, "delayed_frees": 0, "lookup_wait_seconds": 0.0}

    # --------------------------------------------------------------- lookups

    def on_new_request(self, request) -> None:
        """Sends the lookup now, so its answer is there when vLLM asks."""
        if request.prompt_token_ids is None:
            return
        st = self.reqs.get(request.request_id)
        if st is None:
            st = self.reqs[request.request_id] = _Req(request)
        self._submit_lookup(st, (0, request.num_tokens))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> Tuple[Optional[int], bool]:
        req_id = request.request_id
        st = self.reqs.get(req_id)
        if st is None:
            st = self.reqs[req_id] = _Req(request)
        st.request = request
        if request.prompt_token_ids is None:
            self.stats["skipped_requests"] += 1
            logger.debug("kvsidecar: request %s has no prompt token ids (prompt embeddings); not cached", req_id)
            return 0, False
        key = (num_computed_tokens, request.num_tokens)
        if st.load_failed:
            # vLLM resets a request whose load failed and asks again: the same hit would fail the same way.
            self.stats["hits_refused_after_failure"] += 1
            return self._answer(st, key, 0, num_computed_tokens, 0)
        if st.lookup_key == key and st.answer is not None:
            return st.answer  # repeated call: same answer, no side effect
        if st.lookup_fut is None or st.lookup_key[1] != key[1]:
            if not self._submit_lookup(st, key):
                return self._answer(st, key, 0, num_computed_tokens, 0)
        st.lookup_key = key
        reply = self._await(st)
        if reply is None:
            if time.monotonic() - st.lookup_started > self.cfg.lookup_timeout_ms / 1000:
                self.stats["lookup_timeouts"] += 1
                return self._answer(st, key, 0, num_computed_tokens, 0)
            self.stats["lookup_not_yet"] += 1
            return None, False
        if not reply.ok:
            self.stats["lookup_errors"] += 1
            return self._answer(st, key, 0, num_computed_tokens, 0)
        if reply.get(3, 0) == p.LookupState.PENDING:
            # Lower tiers are being promoted into the sidecar's memory: ask again next step, but never for longer
            # than lookup_timeout_ms in all (the sidecar bounds it too).
            now = time.monotonic()
            st.pending_since = st.pending_since or st.lookup_started
            if now - st.pending_since > self.cfg.lookup_timeout_ms / 1000:
                self.stats["lookup_timeouts"] += 1
                return self._answer(st, key, 0, num_computed_tokens, 0)
            st.lookup_fut = None  # ask again next time
            self.stats["lookup_not_yet"] += 1
            return None, False
        return self._answer(st, key, int(reply.get(0, 0)), num_computed_tokens, int(reply.get(2, 0)))

    def _submit_lookup(self, st: _Req, key: Tuple[int, int]) -> bool:
        """Sends a leasing LOOKUP of the request's full chunks; False when there is nothing to ask or no sidecar."""
        request = st.request
        full = (key[1] // self.chunk) * self.chunk
        if full == 0 or not self.client.ensure_connected():
            return False
        # No RELEASE frame: the sidecar ends the request's earlier lease when this leasing LOOKUP arrives.
        st.lease_id = 0
        tokens = p.tokens_to_bytes(request.all_token_ids[:full])
        st.lookup_fut = self.client.submit(p.Opcode.LOOKUP, p.lookup(request.request_id, request.cache_salt, tokens,
                                                                     True))
        if st.lookup_key != key:
            st.pending_since = 0.0  # a new question: its own time limit
        st.lookup_key = key
        st.lookup_started = time.monotonic()
        st.answer = None
        self.stats["lookups"] += 1
        return True

    def _await(self, st: _Req):
        """The lookup's reply, waiting at most what is left of this step's budget; None when not there yet."""
        fut = st.lookup_fut
        if fut.done():
            return fut.result()
        now = time.monotonic()
        if self._step_deadline is None:
            self._step_deadline = now + self.cfg.lookup_wait_ms / 1000
        left = self._step_deadline - now
        if left <= 0:
            return None
        try:
            return fut.result(timeout=left)
        except FutureTimeout:
            return None
        finally:
            self.stats["lookup_wait_seconds"] += time.monotonic() - now

    def _answer(self, st: _Req, key, hit_tokens: int, n_local: int, lease_id: int) -> Tuple[int, bool]:
        num_tokens = key[1]
        # Leave at least one token to compute, and stay block-aligned.
        cap = ((num_tokens - 1) // self.block_size) * self.block_size
        hit = min(hit_tokens, cap)
        ext = hit - n_local if hit > n_local else 0
        self._release(st)
        if ext > 0:
            st.lease_id = lease_id
            self.stats["lookup_hit_tokens"] += ext
            self._answered.append(st)
        else:
            if lease_id:
                self.client.submit(p.Opcode.RELEASE, p.release(lease_id, None))
            self.stats["lookup_misses"] += 1
        st.n_local = n_local
        st.lookup_key = key
        st.lookup_fut = None
        st.answer = (ext, bool(self.cfg.async_load and ext > 0))
        return st.answer

    # --------------------------------------------------------------- allocation

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self.reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens == 0:
            if st.load_op is None:
                self._release(st)
            return
        block_ids = list(blocks.get_block_ids()[0])
        bs, bpc = self.block_size, self.bpc
        first_pos = st.n_local // bs
        end_pos = (st.n_local + num_external_tokens) // bs
        # vLLM passes all of the request's blocks (newest) or only the new ones (older): derive positions.
        offset = 0 if len(block_ids) >= end_pos else first_pos
        first_chunk = first_pos // bpc
        last_chunk = -(-end_pos // bpc)
        ids = [block_ids[pos - offset] if first_pos <= pos < end_pos else -1
               for pos in range(first_chunk * bpc, last_chunk * bpc)]
        tokens = p.tokens_to_bytes(request.all_token_ids[:last_chunk * self.chunk])
        st.load_op = LoadOp(request.request_id, request.cache_salt, tokens, first_chunk, last_chunk - first_chunk,
                            p.block_ids_to_bytes(ids), st.lease_id, bool(self.cfg.async_load))
        st.load_blocks = {b for b in ids if b >= 0}
        st.lease_id = 0  # the workers' LOAD releases it
        st.stored_chunks = max(st.stored_chunks, end_pos // bpc)
        self._loads.append(st)
        self.stats["loads_planned"] += 1

    # --------------------------------------------------------------- per step

    def build_connector_meta(self, so) -> CSharpSidecarMetadata:
        # Every step: a reconnect starts (in the background) within a retry interval of the sidecar's return.
        self.client.ensure_connected()
        meta = CSharpSidecarMetadata()
        for st in self._loads:
            if st.load_op is not None:
                meta.loads.append(st.load_op)
                st.load_op = None
        self._loads.clear()
        self._release_unadmitted()
        self._step_deadline = None
        scheduled = so.num_scheduled_tokens
        for new in so.scheduled_new_reqs:
            st = self.reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0]) if new.block_ids else []
            st.num_computed = new.num_computed_tokens + scheduled.get(new.req_id, 0)
            self._plan_store(st, meta)
        cached = so.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or ()
        # Before resumed_req_ids, vLLM flagged resumed requests with a parallel list of booleans.
        resumed_flags = getattr(cached, "resumed_from_preemption", None)
        for i, req_id in enumerate(cached.req_ids):
            st = self.reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed or (resumed_flags is not None and resumed_flags[i]):
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            st.num_computed = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            self._plan_store(st, meta)
        meta.preempted = list(getattr(so, "preempted_req_ids", None) or ())
        return meta

    def _release_unadmitted(self) -> None:
        """Hits vLLM did not admit in the step (no update_state_after_alloc followed) give their lease back now;
        their lookup goes out again at once, so the answer is ready when vLLM asks in the next step."""
        answered, self._answered = self._answered, []
        for st in answered:
            if st.lease_id and self.reqs.get(st.request.request_id) is st:
                self.stats["leases_released_unadmitted"] += 1
                st.answer = None
                # The new lookup ends the old lease on the sidecar; without a connection, release it explicitly.
                if not self._submit_lookup(st, st.lookup_key):
                    self._release(st)
                    st.lookup_fut = None

    def _plan_store(self, st: _Req, meta: CSharpSidecarMetadata) -> None:
        request = st.request
        if request.prompt_token_ids is None:
            return
        full = st.num_computed // self.chunk
        if not self.cfg.store_output:
            full = min(full, len(request.prompt_token_ids) // self.chunk)
        if full <= st.stored_chunks or len(st.block_ids) < full * self.bpc:
            return
        first = st.stored_chunks
        # A request's first store carries its whole prefix; later ones only the new chunks' tokens.
        tokens_from = first if st.stores_planned else 0
        meta.stores.append(StoreOp(request.request_id, request.cache_salt,
                                   p.tokens_to_bytes(request.all_token_ids[tokens_from * self.chunk:full * self.chunk]),
                                   first, full - first,
                                   p.block_ids_to_bytes(st.block_ids[first * self.bpc:full * self.bpc]), tokens_from))
        st.stored_chunks = full
        st.stores_planned += 1
        self.stats["stores_planned"] += 1

    # --------------------------------------------------------------- outcomes

    def update_connector_output(self, output) -> None:
        """Remembers requests whose load failed, from ``failed_recving`` (newest vLLM) or the failed blocks."""
        if output is None:
            return
        failed = set(getattr(output, "failed_recving", None) or ())
        invalid = set(getattr(output, "invalid_block_ids", None) or ())
        if not failed and not invalid:
            return
        for req_id, st in self.reqs.items():
            if req_id in failed or (invalid and not st.load_blocks.isdisjoint(invalid)):
                if not st.load_failed:
                    st.load_failed = True
                    self.stats["failed_loads"] += 1

    def request_finished(self, request, block_ids) -> Tuple[bool, Optional[dict]]:
        st = self.reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        self._release(st)
        # Stores run after the forward without holding it up: a request that stored anything keeps its blocks
        # until every worker reports the stores done (finished_sending).
        if st.stores_planned:
            self.stats["delayed_frees"] += 1
            return True, None
        return False, None

    def _release(self, st: _Req) -> None:
        if st.lease_id:
            self.client.submit(p.Opcode.RELEASE, p.release(st.lease_id, None))
            st.lease_id = 0

    def shutdown(self) -> None:
        self.client.close()
