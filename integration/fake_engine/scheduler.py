"""A faithful subset of vLLM's scheduler (engines.md 1.4-1.5): a block pool with an optional local prefix
cache, waiting and running queues, chunked prefill, preemption (no admission in a step that preempted),
WAITING_FOR_REMOTE_KVS, finished ids carried to the next step, and the connector calls in vLLM's order."""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Dict, List, Optional, Set

from vllm.v1.core.kv_cache_manager import KVCacheBlock, KVCacheBlocks
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.request import Request, RequestStatus


class BlockPool:
    """Free blocks in LRU order; full blocks keep their content hash until reused (the prefix cache)."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool):
        self.free: "OrderedDict[int, None]" = OrderedDict((b, None) for b in range(num_blocks))
        self.refs = [0] * num_blocks
        self.hash_of: Dict[int, bytes] = {}
        self.cached: Dict[bytes, int] = {}
        self.enabled = enable_prefix_caching

    def take(self, n: int) -> Optional[List[int]]:
        if len(self.free) < n:
            return None
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.hash_of.pop(b, None)
            if h is not None and self.cached.get(h) == b:
                del self.cached[h]
            self.refs[b] = 1
            out.append(b)
        return out

    def touch(self, b: int) -> None:
        self.free.pop(b, None)
        self.refs[b] += 1

    def release(self, blocks: List[int]) -> None:
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free[b] = None

    def cache(self, b: int, h: bytes) -> None:
        if self.enabled and h not in self.cached:
            self.cached[h] = b
            self.hash_of[b] = h


def block_hashes(tokens: List[int], block_size: int, salt: Optional[str], n_blocks: int) -> List[bytes]:
    out, prev = [], hashlib.sha256((salt or "").encode()).digest()
    for i in range(n_blocks):
        prev = hashlib.sha256(prev + repr(tokens[i * block_size:(i + 1) * block_size]).encode()).digest()
        out.append(prev)
    return out


class FakeScheduler:
    def __init__(self, connector, block_size: int, num_blocks: int, max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, enable_prefix_caching: bool = False, runner: str = "v2",
                 kv_load_failure_policy: str = "recompute"):
        self.connector = connector
        self.bs = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.max_tokens_per_step = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.runner = runner
        self.policy = kv_load_failure_policy
        self.requests: Dict[str, Request] = {}
        self.blocks: Dict[str, List[int]] = {}
        self.waiting: deque = deque()
        self.running: List[Request] = []
        self.finished_req_ids: Set[str] = set()
        self.finished_recving: Set[str] = set()
        self.delayed_free: Set[str] = set()
        self.pending_computed: Dict[str, int] = {}
        self.scheduled_before: Set[str] = set()
        self.external_tokens = 0
        self.local_tokens = 0
        self.computed_prompt_tokens = 0
        self.events = []
        self.finished: List[Request] = []

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.connector.on_new_request(request)

    def has_work(self) -> bool:
        # As vLLM's has_requests(): a finished request whose blocks wait for its stores still keeps the engine stepping.
        return bool(self.waiting or self.running or self.delayed_free)

    # ------------------------------------------------------------------ schedule

    def _allocate(self, req: Request, num_tokens_total: int) -> bool:
        blocks = self.blocks.setdefault(req.request_id, [])
        need = -(-num_tokens_total // self.bs) - len(blocks)
        if need <= 0:
            return True
        got = self.pool.take(need)
        if got is None:
            return False
        blocks.extend(got)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(self.blocks.pop(req.request_id, []))
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.scheduled_before.discard(req.request_id)
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_tokens_per_step
        new_reqs: List[NewRequestData] = []
        cached = CachedRequestData()
        num_scheduled: Dict[str, int] = {}
        preempted: Set[str] = set()
        has_sync_loads = False

        for req in list(self.running):
            if budget <= 0:
                break
            if req not in self.running:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            before = len(self.blocks.get(req.request_id, []))
            while not self._allocate(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
            if req.request_id in preempted:
                continue
            blocks = self.blocks[req.request_id]
            num_scheduled[req.request_id] = n
            budget -= n
            cached.req_ids.append(req.request_id)
            cached.new_block_ids.append((blocks[before:],) if len(blocks) > before else None)
            cached.num_computed_tokens.append(req.num_computed_tokens)
            cached.num_output_tokens.append(req.num_output_tokens)
            cached.all_token_ids[req.request_id] = list(req.all_token_ids)

        if not preempted:
            for req in list(self.waiting):
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    break
                resumed = req.status == RequestStatus.PREEMPTED
                if req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                    if req.request_id not in self.finished_recving:
                        continue
                    self.finished_recving.discard(req.request_id)
                    computed = self.pending_computed.pop(req.request_id)
                    if computed >= req.num_tokens:
                        computed = req.num_tokens - 1
                    req.num_computed_tokens = computed
                    req.status = RequestStatus.PREEMPTED if req.num_preemptions else RequestStatus.WAITING
                    resumed = req.num_preemptions > 0
                if req.num_computed_tokens == 0:
                    local, n_local = self._local_hit(req)
                    ext, is_async = self.connector.get_num_new_matched_tokens(req, n_local)
                    if ext is None:
                        for b in local:
                            self.pool.release([b])
                        continue
                    assert not (ext == 0 and is_async), "(0, True) is invalid"
                    req.num_external_computed_tokens = ext
                    computed = n_local + ext
                    self.blocks[req.request_id] = local
                else:
                    n_local, ext, is_async, computed = 0, 0, False, req.num_computed_tokens
                n = 0 if is_async else min(req.num_tokens - computed, budget)
                if not self._allocate(req, computed + n):
                    self.pool.release(self.blocks.pop(req.request_id, []))
                    break
                blocks = self.blocks[req.request_id]
                self.connector.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(b) for b in blocks],)), ext)
                if is_async:
                    req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                    self.pending_computed[req.request_id] = computed
                    self.external_tokens += ext
                    self.local_tokens += n_local
                    continue
                if ext > 0:
                    has_sync_loads = True
                self.external_tokens += ext
                self.local_tokens += n_local
                self.waiting.remove(req)
                self.running.append(req)
                req.status = RequestStatus.RUNNING
                req.num_computed_tokens = computed
                num_scheduled[req.request_id] = n
                budget -= n
                if resumed and self.runner == "v1":
                    cached.req_ids.append(req.request_id)
                    cached.resumed_req_ids.add(req.request_id)
                    cached.new_block_ids.append((list(blocks),))
                    cached.num_computed_tokens.append(computed)
                    cached.num_output_tokens.append(req.num_output_tokens)
                    cached.all_token_ids[req.request_id] = list(req.all_token_ids)
                else:
                    new_reqs.append(NewRequestData(req.request_id, req.prompt_token_ids, (list(blocks),), computed,
                                                   prefill_token_ids=list(req.all_token_ids)))

        so = SchedulerOutput(new_reqs, cached, num_scheduled, sum(num_scheduled.values()),
                             finished_req_ids=self.finished_req_ids, preempted_req_ids=preempted or None,
                             has_sync_kv_loads=has_sync_loads)
        so.kv_connector_metadata = self.connector.build_connector_meta(so)
        self.finished_req_ids = set()
        for req_id, n in num_scheduled.items():
            req = self.requests[req_id]
            if req.num_computed_tokens < req.num_prompt_tokens:
                self.computed_prompt_tokens += min(n, req.num_prompt_tokens - req.num_computed_tokens)
            req.num_computed_tokens += n
        return so

    def _local_hit(self, req: Request):
        if not self.pool.enabled:
            return [], 0
        limit = (req.num_tokens - 1) // self.bs
        hashes = block_hashes(req.all_token_ids, self.bs, req.cache_salt, limit)
        blocks = []
        for h in hashes:
            b = self.pool.cached.get(h)
            if b is None:
                break
            self.pool.touch(b)
            blocks.append(b)
        return blocks, len(blocks) * self.bs

    # ------------------------------------------------------------------ outputs

    def update_from_output(self, so: SchedulerOutput, kv_output, sample) -> None:
        invalid = kv_output.invalid_block_ids
        truncated = set()
        if invalid:
            truncated = self._handle_invalid_blocks(so, invalid)
        for req_id in so.num_scheduled_tokens:
            req = self.requests.get(req_id)
            if req is None or req_id in truncated or req.is_finished():
                continue
            self._cache_full_blocks(req)
            if req.num_computed_tokens >= req.num_tokens:
                req.append_output_token_ids(sample(req))
                if req.num_output_tokens >= req.max_tokens:
                    self._finish(req, RequestStatus.FINISHED_LENGTH_CAPPED)
        self.connector.update_connector_output(kv_output)
        for req_id in kv_output.finished_recving or ():
            req = self.requests.get(req_id)
            if req is not None and req.is_finished():
                self._free(req)
            else:
                self.finished_recving.add(req_id)
        for req_id in kv_output.finished_sending or ():
            assert req_id in self.requests, f"finished_sending for unknown request {req_id}"
            self._free(self.requests[req_id])
        self.events.extend(self.connector.take_events())

    def _handle_invalid_blocks(self, so, invalid) -> Set[str]:
        affected = set()
        for req_id in so.num_scheduled_tokens:
            blocks = self.blocks.get(req_id, [])
            bad = [i for i, b in enumerate(blocks) if b in invalid]
            if not bad:
                continue
            req = self.requests[req_id]
            affected.add(req_id)
            if self.policy == "fail":
                self._finish(req, RequestStatus.FINISHED_ERROR)
            else:
                req.num_computed_tokens = min(req.num_computed_tokens, bad[0] * self.bs)
        return affected

    def _cache_full_blocks(self, req: Request) -> None:
        if not self.pool.enabled:
            return
        blocks = self.blocks.get(req.request_id, [])
        n = min(req.num_computed_tokens // self.bs, len(blocks))
        for i, h in enumerate(block_hashes(req.all_token_ids, self.bs, req.cache_salt, n)):
            self.pool.cache(blocks[i], h)

    def _finish(self, req: Request, status) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.finished.append(req)
        self.finished_req_ids.add(req.request_id)
        delay, _params = self.connector.request_finished(req, list(self.blocks.get(req.request_id, [])))
        if delay:
            self.delayed_free.add(req.request_id)
        elif req.request_id not in self.pending_computed:
            self._free(req)

    def abort(self, req_id: str) -> None:
        req = self.requests.get(req_id)
        if req is not None and not req.is_finished():
            self._finish(req, RequestStatus.FINISHED_ABORTED)

    def _free(self, req: Request) -> None:
        self.pool.release(self.blocks.pop(req.request_id, []))
        self.requests.pop(req.request_id, None)
        self.delayed_free.discard(req.request_id)
