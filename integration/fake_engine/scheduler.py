"""A faithful subset of vLLM's scheduler (engines.md 1.4-1.5; engines-drift.md 2.1 with ``api="newest"``): a
block pool with an optional local prefix cache, waiting and running queues, chunked prefill, preemption (no
admission in a step that preempted), WAITING_FOR_REMOTE_KVS, finished ids carried to the next step, the
delayed free of ``request_finished -> (True, ...)`` until ``finished_sending``, load failures (block-level
``invalid_block_ids``, and request-level ``failed_recving`` in newest), and the connector calls in vLLM's order.

What ``api="newest"`` changes:

* ``bind_kv_cache_manager(kv_cache_manager)`` instead of ``bind_gpu_block_pool(block_pool)``;
* ``get_num_new_matched_tokens`` receives the block-aligned local hit; with ``local_partial_tail`` the local
  prefix cache can also hit a partial tail block: a remote hit past it truncates the local tail, otherwise the
  external hit is forced to ``(0, False)``; the external hit is rounded down to a block;
* an async load answered ``(n, True)`` may not be admitted in that step (no room next to the reservations of
  in-flight prefills, or ``refuse_async_admission_every``):
  no ``update_state_after_alloc`` follows and the request is asked again in a later step;
* ``failed_recving``: recompute (``num_computed_tokens = 0``, retried) or fail (``FINISHED_ERROR``);
* ``get_kv_connector_stats()`` on every ``update_from_output``; ``has_pending_block_frees()`` stops the
  running loop instead of preempting; ``new_block_ids_to_zero`` and ``kv_cache_block_copies`` in the output.

Invariants the fake enforces (a violation raises :class:`ContractViolation` or :class:`Livelock` with the
request's history): ``(0, True)`` is invalid; an external hit must leave one token to compute; every id in
``finished_sending`` / ``finished_recving`` / ``failed_recving`` names a request the scheduler still holds
(vLLM asserts this); ``finished_sending`` only for requests whose ``request_finished`` returned True; a request
may not be given more than ``max_load_attempts`` external hits (the livelock guard)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Dict, List, Optional, Set, Tuple

from vllm.v1.core.kv_cache_manager import KVCacheBlock, KVCacheBlocks, KVCacheManager
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.request import Request, RequestStatus

from fake_engine.errors import ContractViolation, Livelock

V029, NEWEST = "v029", "newest"


class BlockPool:
    """Free blocks in LRU order; full blocks keep their content hash until reused (the prefix cache), and with
    partial tails enabled a finished request's last partial block is cached too (keyed by its parent hash and
    its tokens)."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool):
        self.num_gpu_blocks = num_blocks
        self.free: "OrderedDict[int, None]" = OrderedDict((b, None) for b in range(num_blocks))
        self.refs = [0] * num_blocks
        self.hash_of: Dict[int, bytes] = {}
        self.cached: Dict[bytes, int] = {}
        self.tail_of: Dict[int, Tuple[bytes, tuple]] = {}
        self.tails: Dict[bytes, Dict[tuple, int]] = {}
        self.enabled = enable_prefix_caching
        self.enable_caching = enable_prefix_caching
        self.newly_allocated: Set[int] = set()   # since the last schedule(): the worker zeroes or poisons them
        self.freed_uncached: Set[int] = set()    # freed with no cached content: nothing may read them any more

    def get_num_free_blocks(self) -> int:
        return len(self.free)

    def get_usage(self) -> float:
        return 1.0 - len(self.free) / self.num_gpu_blocks

    def take(self, n: int) -> Optional[List[int]]:
        if len(self.free) < n:
            return None
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            self._uncache(b)
            self.refs[b] = 1
            self.newly_allocated.add(b)
            self.freed_uncached.discard(b)
            out.append(b)
        return out

    def _uncache(self, b: int) -> None:
        h = self.hash_of.pop(b, None)
        if h is not None and self.cached.get(h) == b:
            del self.cached[h]
        tail = self.tail_of.pop(b, None)
        if tail is not None:
            parent, tokens = tail
            entries = self.tails.get(parent, {})
            if entries.get(tokens) == b:
                del entries[tokens]

    def touch(self, b: int) -> None:
        self.free.pop(b, None)
        self.refs[b] += 1

    def release(self, blocks: List[int]) -> None:
        for b in reversed(blocks):
            self.refs[b] -= 1
            assert self.refs[b] >= 0, f"block {b} released more often than taken"
            if self.refs[b] == 0:
                self.free[b] = None
                if b not in self.hash_of and b not in self.tail_of:
                    self.freed_uncached.add(b)

    def cache(self, b: int, h: bytes) -> None:
        if self.enabled and h not in self.cached and b not in self.hash_of:
            self.cached[h] = b
            self.hash_of[b] = h

    def cache_tail(self, b: int, parent: bytes, tokens: tuple) -> None:
        if self.enabled and b not in self.hash_of and b not in self.tail_of:
            entries = self.tails.setdefault(parent, {})
            if tokens not in entries:
                entries[tokens] = b
                self.tail_of[b] = (parent, tokens)

    def all_free(self) -> bool:
        return len(self.free) == self.num_gpu_blocks and not any(self.refs)


def block_hashes(tokens: List[int], block_size: int, salt: Optional[str], n_blocks: int) -> List[bytes]:
    out, prev = [], root_hash(salt)
    for i in range(n_blocks):
        prev = hashlib.sha256(prev + repr(tokens[i * block_size:(i + 1) * block_size]).encode()).digest()
        out.append(prev)
    return out


def root_hash(salt: Optional[str]) -> bytes:
    return hashlib.sha256((salt or "").encode()).digest()


class RequestRecord:
    """What the harness saw of one request: for assertions and for the message of a failed run."""

    __slots__ = ("lookups", "not_yet", "load_attempts", "claimed_external", "failed_loads", "refused_admissions",
                 "async_admission_attempts", "prompt_tokens_computed", "local_tokens", "events")

    def __init__(self):
        self.lookups = 0                # get_num_new_matched_tokens calls
        self.not_yet = 0                # (None, _) answers
        self.load_attempts = 0          # admissions with an external hit (update_state_after_alloc with ext > 0)
        self.claimed_external = 0       # external tokens over all those admissions
        self.failed_loads = 0           # loads reported failed (invalid blocks or failed_recving)
        self.refused_admissions = 0     # async hits the scheduler did not admit in that step (newest)
        self.async_admission_attempts = 0  # async hits that reached the admission check (newest)
        self.prompt_tokens_computed = 0  # prompt tokens the forward computed (recomputed ones included)
        self.local_tokens = 0
        self.events: List[str] = []     # a short history, newest last

    def note(self, step: int, event: str) -> None:
        self.events.append(f"step {step}: {event}")
        del self.events[:-12]


class FakeScheduler:
    def __init__(self, connector, block_size: int, num_blocks: int, max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, enable_prefix_caching: bool = False, runner: str = "v2",
                 kv_load_failure_policy: str = "recompute", api: str = V029, refuse_async_admission_every: int = 0,
                 local_partial_tail: bool = False, max_load_attempts: int = 16):
        if api not in (V029, NEWEST):
            raise ValueError(f"api={api!r}")
        if local_partial_tail and api != NEWEST:
            raise ValueError("local partial-tail hits are a newest-vLLM behaviour (api='newest')")
        if refuse_async_admission_every and api != NEWEST:
            raise ValueError("the reservation check that refuses async admissions is newest-vLLM (api='newest')")
        if refuse_async_admission_every == 1:
            raise ValueError("refuse_async_admission_every=1 would never admit an async load")
        self.connector = connector
        self.api = api
        self.newest = api == NEWEST
        self.bs = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.max_tokens_per_step = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.runner = runner
        self.policy = kv_load_failure_policy
        self.refuse_every = refuse_async_admission_every
        self.local_partial_tail = local_partial_tail
        self.max_load_attempts = max_load_attempts
        self.requests: Dict[str, Request] = {}
        self.blocks: Dict[str, List[int]] = {}
        self.kv_cache_manager = KVCacheManager(self.pool, self.blocks, block_size)
        self.waiting: deque = deque()
        self.running: List[Request] = []
        self.finished_req_ids: Set[str] = set()
        self.finished_recving: Set[str] = set()        # async loads done: promote at the next schedule()
        self.failed_recving: Dict[str, int] = {}       # async loads that failed: tokens still valid
        self.holds: Dict[str, Set[str]] = {}           # finished requests whose blocks wait: "sending"/"recving"
        self.delayed_free: Set[str] = set()            # requests whose request_finished returned True, not yet freed
        self.pending_computed: Dict[str, int] = {}
        self.records: Dict[str, RequestRecord] = {}
        self.external_tokens = 0
        self.local_tokens = 0
        self.computed_prompt_tokens = 0
        self.events = []
        self.finished: List[Request] = []
        self.step_index = 0
        self.loads_planned: List[str] = []             # requests given an external hit in the last schedule()
        self._skip_zero: Set[int] = set()
        self._copies: List[Tuple[int, int]] = []
        self._copy_sources: List[int] = []
        self.stats_calls = 0
        # Scheduler.__init__: the connector learns the block pool right after the KV cache manager is built.
        if self.newest:
            _call_optional(connector, "bind_kv_cache_manager", self.kv_cache_manager)
        else:
            _call_optional(connector, "bind_gpu_block_pool", self.pool)

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.records[request.request_id] = RequestRecord()
        self.waiting.append(request)
        self.connector.on_new_request(request)

    def record(self, req_id: str) -> RequestRecord:
        return self.records.setdefault(req_id, RequestRecord())

    def has_work(self) -> bool:
        """vLLM's has_requests(): unfinished requests, or finished ids still to be shipped to the workers."""
        return bool(self.waiting or self.running or self.finished_req_ids)

    def has_pending_transfers(self) -> bool:
        """Finished requests whose blocks still wait for a transfer to report (delayed frees)."""
        return bool(self.holds)

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
        self.record(req.request_id).note(self.step_index, "preempted")
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        self.step_index += 1
        budget = self.max_tokens_per_step
        new_reqs: List[NewRequestData] = []
        cached = CachedRequestData()
        num_scheduled: Dict[str, int] = {}
        preempted: Set[str] = set()
        has_sync_loads = False
        self.loads_planned = []
        self._skip_zero = set()
        self._copies = []

        for req in list(self.running):
            if budget <= 0:
                break
            if req not in self.running:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            before = len(self.blocks.get(req.request_id, []))
            stalled = False
            while not self._allocate(req, req.num_computed_tokens + n):
                if self.newest and _call_optional(self.connector, "has_pending_block_frees", default=False):
                    stalled = True  # pending transfers will release blocks: wait instead of preempting
                    break
                victim = self.running[-1]
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
            if stalled:
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
            order = list(self.waiting)
            if self.newest:
                # The kv_holding_waiting queue (requests whose async load finished or is in flight) comes first.
                order = [r for r in order if self._holds_kv(r)] + [r for r in order if not self._holds_kv(r)]
            for req in order:
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    break
                rec = self.record(req.request_id)
                resumed = req.status == RequestStatus.PREEMPTED
                if req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                    if req.request_id not in self.finished_recving:
                        continue
                    self._update_waiting_for_remote_kv(req)
                    resumed = req.num_preemptions > 0
                tail_src = None
                fresh = req.num_computed_tokens == 0
                if fresh:
                    local, n_local, tail = self._local_hit(req)
                    aligned = n_local - n_local % self.bs
                    ext, is_async = self.connector.get_num_new_matched_tokens(req, aligned if self.newest else n_local)
                    rec.lookups += 1
                    if ext is None:
                        rec.not_yet += 1
                        self.pool.release(local + ([tail[0]] if tail else []))
                        continue
                    self._check_answer(req, aligned if self.newest else n_local, ext, is_async)
                    if self.newest:
                        ext -= ext % self.bs  # no prefix-replay checkpoints: the hit is rounded down to a block
                        if ext == 0:
                            is_async = False
                        if tail is not None:
                            if aligned + ext > n_local:
                                self.pool.release([tail[0]])  # the remote load covers the local tail block
                                rec.note(self.step_index, f"local tail of {n_local - aligned} tokens truncated")
                                n_local = aligned
                            else:
                                ext, is_async = 0, False      # a local partial tail wins over a shorter remote hit
                                tail_src = tail[0]
                        else:
                            n_local = aligned
                    if self.skip_reading_prefix_cache(req):
                        ext, is_async = 0, False
                    req.num_external_computed_tokens = ext
                    computed = n_local + ext
                    self.blocks[req.request_id] = local
                else:
                    n_local, ext, is_async, computed = 0, 0, False, req.num_computed_tokens
                n = 0 if is_async else min(req.num_tokens - computed, budget)
                if is_async and self.newest and not self._async_admissible(req, rec, ext):
                    self.pool.release(self.blocks.pop(req.request_id, []))
                    break
                if not self._allocate(req, computed + n):
                    if fresh:  # the local hit is not committed; blocks a finished async load filled stay
                        self.pool.release(self.blocks.pop(req.request_id, []))
                    if tail_src is not None:
                        self.pool.release([tail_src])
                    break
                blocks = self.blocks[req.request_id]
                if tail_src is not None:
                    # The partial tail block is copied into the request's own block before the forward.
                    self._copies.append((tail_src, blocks[n_local // self.bs]))
                    self._copy_sources.append(tail_src)
                self.connector.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(b) for b in blocks],)), ext)
                if ext > 0:
                    self._note_load(req, rec, ext, is_async)
                rec.local_tokens += n_local
                if is_async:
                    req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                    self.pending_computed[req.request_id] = computed
                    self._skip_zero.update(blocks)
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
        if self.newest:
            so.new_block_ids_to_zero = sorted(self.pool.newly_allocated - self._skip_zero)
            so.kv_cache_block_copies = list(self._copies)
        so.kv_connector_metadata = self.connector.build_connector_meta(so)
        self.finished_req_ids = set()
        for req_id, n in num_scheduled.items():
            req = self.requests[req_id]
            if req.num_computed_tokens < req.num_prompt_tokens:
                k = min(n, req.num_prompt_tokens - req.num_computed_tokens)
                self.computed_prompt_tokens += k
                self.record(req_id).prompt_tokens_computed += k
            req.num_computed_tokens += n
        return so

    def _async_admissible(self, req: Request, rec: RequestRecord, ext: int) -> bool:
        """Newest: an async load is admitted only if the request's whole prefill fits in the free blocks minus
        those reserved for the prefills of requests whose async loads are in flight (else every block could end
        up held by loaded requests that cannot grow). The harness also refuses each request's first attempt and
        every K-th one after it (``refuse_async_admission_every``)."""
        reserved = sum(max(0, -(-r.num_tokens // self.bs) - len(self.blocks.get(r.request_id, [])))
                       for r in self.waiting if r is not req and self._holds_kv(r))
        need = -(-req.num_tokens // self.bs) - len(self.blocks.get(req.request_id, []))
        reason = None
        if need > len(self.pool.free) - reserved:
            reason = f"needs {need} blocks, {len(self.pool.free)} free, {reserved} reserved"
        elif self.refuse_every:
            rec.async_admission_attempts += 1
            if (rec.async_admission_attempts - 1) % self.refuse_every == 0:
                reason = "refused by the harness"
        if reason is None:
            return True
        rec.refused_admissions += 1
        rec.note(self.step_index, f"async hit of {ext} tokens not admitted ({reason})")
        return False

    def _holds_kv(self, req: Request) -> bool:
        """A waiting request that holds blocks: its async load is in flight or done, not yet scheduled."""
        return req.status == RequestStatus.WAITING_FOR_REMOTE_KVS or bool(self.blocks.get(req.request_id))

    def take_fresh_blocks(self) -> Tuple[Set[int], Set[int]]:
        """(blocks allocated since the last call, blocks freed with no cached content since the last call): what
        the worker may overwrite before the next forward (the harness poisons them to catch late readers)."""
        new, freed = self.pool.newly_allocated, self.pool.freed_uncached
        self.pool.newly_allocated, self.pool.freed_uncached = set(), set()
        return new, freed - new

    def skip_reading_prefix_cache(self, req: Request) -> bool:
        return self.newest and bool(getattr(req, "skip_reading_prefix_cache", False))

    def _check_answer(self, req: Request, num_computed: int, ext: int, is_async: bool) -> None:
        if not isinstance(ext, int) or ext < 0:
            self._violation(req, f"get_num_new_matched_tokens returned {ext!r} external tokens")
        if ext == 0 and is_async:
            self._violation(req, "get_num_new_matched_tokens returned (0, True), which vLLM rejects")
        if ext > 0 and not is_async and num_computed + ext >= req.num_tokens:
            # (An async hit may cover every token: the scheduler then recomputes the last one.)
            self._violation(req, f"a sync external hit of {ext} tokens after {num_computed} local ones leaves no "
                                 f"token of the {req.num_tokens} to compute")

    def _note_load(self, req: Request, rec: RequestRecord, ext: int, is_async: bool) -> None:
        rec.load_attempts += 1
        rec.claimed_external += ext
        rec.note(self.step_index, f"{'async' if is_async else 'sync'} load of {ext} external tokens admitted")
        self.loads_planned.append(req.request_id)
        if rec.load_attempts > self.max_load_attempts:
            raise Livelock(f"livelock: request {req.request_id} was given an external hit {rec.load_attempts} times "
                           f"(claimed {rec.claimed_external} tokens in total, {rec.failed_loads} loads failed, prompt "
                           f"{req.num_prompt_tokens} tokens); after a failed load the connector must stop offering "
                           f"that hit. History:\n  " + "\n  ".join(rec.events))

    def _violation(self, req: Optional[Request], message: str) -> None:
        history = ""
        if req is not None:
            history = "\n  " + "\n  ".join(self.record(req.request_id).events)
        raise ContractViolation(f"step {self.step_index}: {message}{history}")

    def _update_waiting_for_remote_kv(self, req: Request) -> None:
        """The async load reported: cache the loaded blocks and make the request schedulable, or, after a
        failure, keep only what is still valid (vLLM frees everything when nothing is)."""
        req_id = req.request_id
        self.finished_recving.discard(req_id)
        computed = self.pending_computed.pop(req_id)
        if req_id in self.failed_recving:
            computed = self.failed_recving.pop(req_id)
            if computed == 0:
                self.pool.release(self.blocks.pop(req_id, []))
            self.record(req_id).note(self.step_index, f"failed async load: {computed} tokens kept, rest recomputed")
        elif computed >= req.num_tokens:
            computed = req.num_tokens - 1
        req.num_computed_tokens = computed
        req.status = RequestStatus.PREEMPTED if req.num_preemptions else RequestStatus.WAITING

    def _local_hit(self, req: Request):
        """(full blocks hit, tokens hit, (tail block, tail tokens) or None), every hit block touched."""
        if not self.pool.enabled:
            return [], 0, None
        limit = (req.num_tokens - 1) // self.bs
        hashes = block_hashes(req.all_token_ids, self.bs, req.cache_salt, limit)
        blocks = []
        for h in hashes:
            b = self.pool.cached.get(h)
            if b is None:
                break
            self.pool.touch(b)
            blocks.append(b)
        n = len(blocks) * self.bs
        tail = None
        if self.local_partial_tail:
            parent = hashes[len(blocks) - 1] if blocks else root_hash(req.cache_salt)
            best = None
            for tokens, b in self.pool.tails.get(parent, {}).items():
                k = len(tokens)
                if n + k < req.num_tokens and tuple(req.all_token_ids[n:n + k]) == tokens and (best is None or k > best[1]):
                    best = (b, k)
            if best is not None:
                self.pool.touch(best[0])
                tail = best
                n += best[1]
        return blocks, n, tail

    # ------------------------------------------------------------------ outputs

    def update_from_output(self, so: SchedulerOutput, kv_output, sample) -> None:
        # The partial-tail copies of this step are done: their sources may be reused.
        self.pool.release(self._copy_sources)
        self._copy_sources = []
        if self.newest:
            failed = getattr(kv_output, "failed_recving", None) or set()
            if failed:
                self._handle_failed_recving(failed)
        truncated = set()
        if kv_output.invalid_block_ids:
            truncated = self._handle_invalid_blocks(so, kv_output.invalid_block_ids)
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
            if req is None:
                self._violation(None, f"finished_recving names request {req_id}, which the scheduler no longer "
                                      "holds (vLLM asserts req_id in self.requests)")
            if req.is_finished():
                self._release_hold(req, "recving")
            elif req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                self.finished_recving.add(req_id)
            else:
                self._violation(req, f"finished_recving names request {req_id} in status {req.status.name}: only an "
                                     "async load (WAITING_FOR_REMOTE_KVS) may be reported")
        for req_id in kv_output.finished_sending or ():
            req = self.requests.get(req_id)
            if req is None:
                self._violation(None, f"finished_sending names request {req_id}, which the scheduler no longer holds "
                                      "(vLLM asserts req_id in self.requests; report each request once, after its "
                                      "request_finished returned True)")
            if "sending" not in self.holds.get(req_id, ()):
                self._violation(req, f"finished_sending names request {req_id}, whose request_finished did not return "
                                     "True (its blocks were never held for a transfer)")
            self._release_hold(req, "sending")
        if self.newest or kv_output.kv_connector_stats is not None:
            self.stats_calls += 1
            _call_optional(self.connector, "get_kv_connector_stats")
        self.events.extend(self.connector.take_events())

    def _handle_failed_recving(self, failed: Set[str]) -> None:
        """Newest: request-level receive failures. Recompute: the request starts over (num_computed_tokens 0,
        asked again); fail: it finishes with FINISHED_ERROR. Both wait for the id in finished_recving."""
        for req_id in failed:
            req = self.requests.get(req_id)
            if req is None:
                self._violation(None, f"failed_recving names request {req_id}, which the scheduler no longer holds")
            if req.is_finished():
                continue
            if req.status != RequestStatus.WAITING_FOR_REMOTE_KVS:
                self._violation(req, f"failed_recving names request {req_id} in status {req.status.name}: only async "
                                     "loads are reported there")
            rec = self.record(req_id)
            rec.failed_loads += 1
            rec.note(self.step_index, "async load reported in failed_recving")
            if self.policy == "fail":
                self._finish(req, RequestStatus.FINISHED_ERROR)
            else:
                self.failed_recving[req_id] = 0

    def _handle_invalid_blocks(self, so, invalid) -> Set[str]:
        """Block-level load errors (one KV cache group): async loads keep the tokens before the first bad block
        and are promoted when finished_recving arrives; sync loads scheduled this step are truncated to it and
        recomputed. With the "fail" policy the affected requests finish with FINISHED_ERROR."""
        affected = set()
        for req in list(self.waiting):
            if req.status != RequestStatus.WAITING_FOR_REMOTE_KVS:
                continue
            blocks = self.blocks.get(req.request_id, [])
            covered = -(-self.pending_computed.get(req.request_id, 0) // self.bs)
            bad = [i for i, b in enumerate(blocks[:covered]) if b in invalid]
            if not bad:
                continue
            rec = self.record(req.request_id)
            rec.failed_loads += 1
            rec.note(self.step_index, f"async load: {len(bad)} invalid blocks reported")
            if self.policy == "fail":
                self._finish(req, RequestStatus.FINISHED_ERROR)
            else:
                keep = bad[0] * self.bs
                self.failed_recving[req.request_id] = min(keep, self.failed_recving.get(req.request_id, keep))
        for req_id in so.num_scheduled_tokens:
            blocks = self.blocks.get(req_id, [])
            bad = [i for i, b in enumerate(blocks) if b in invalid]
            if not bad:
                continue
            req = self.requests[req_id]
            affected.add(req_id)
            rec = self.record(req_id)
            rec.failed_loads += 1
            rec.note(self.step_index, f"sync load: {len(bad)} invalid blocks reported")
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

    def _cache_partial_tail(self, req: Request) -> None:
        blocks = self.blocks.get(req.request_id, [])
        full, k = divmod(req.num_computed_tokens, self.bs)
        if k == 0 or len(blocks) <= full:
            return
        parent = block_hashes(req.all_token_ids, self.bs, req.cache_salt, full)[-1] if full else root_hash(req.cache_salt)
        self.pool.cache_tail(blocks[full], parent, tuple(req.all_token_ids[full * self.bs:full * self.bs + k]))

    def _finish(self, req: Request, status) -> None:
        waiting_remote = req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        req.status = status
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.finished.append(req)
        self.finished_req_ids.add(req.request_id)
        self.record(req.request_id).note(self.step_index, f"finished ({status.name})")
        blocks = list(self.blocks.get(req.request_id, []))
        if self.newest:
            # get_block_ids_for_computed_tokens(): the blocks that hold computed tokens (partial tail included).
            blocks = blocks[:-(-req.num_computed_tokens // self.bs)] if req.num_computed_tokens else []
        if self.local_partial_tail and not waiting_remote:
            self._cache_partial_tail(req)
        delay, _params = self.connector.request_finished(req, blocks)
        holds = set()
        if delay:
            holds.add("sending")
            self.delayed_free.add(req.request_id)
        if waiting_remote:
            holds.add("recving")  # the load may still write the blocks: freed when finished_recving arrives
        if holds:
            self.holds[req.request_id] = holds
        else:
            self._free(req)

    def _release_hold(self, req: Request, what: str) -> None:
        holds = self.holds.get(req.request_id)
        if holds is None:
            return
        holds.discard(what)
        if not holds:
            del self.holds[req.request_id]
            self._free(req)

    def abort(self, req_id: str) -> None:
        req = self.requests.get(req_id)
        if req is not None and not req.is_finished():
            self._finish(req, RequestStatus.FINISHED_ABORTED)

    def _free(self, req: Request) -> None:
        self.pool.release(self.blocks.pop(req.request_id, []))
        self.requests.pop(req.request_id, None)
        self.pending_computed.pop(req.request_id, None)
        self.failed_recving.pop(req.request_id, None)
        self.finished_recving.discard(req.request_id)
        self.delayed_free.discard(req.request_id)
        self.holds.pop(req.request_id, None)

    # ------------------------------------------------------------------ diagnostics

    def describe(self) -> str:
        """Every request the scheduler still holds: for the message of a run that did not finish."""
        lines = []
        for req_id, req in self.requests.items():
            rec = self.record(req_id)
            lines.append(f"{req_id}: {req.status.name}, computed {req.num_computed_tokens}/{req.num_tokens}, "
                         f"holds {sorted(self.holds.get(req_id, ()))}, lookups {rec.lookups} "
                         f"(not yet {rec.not_yet}), loads {rec.load_attempts} (failed {rec.failed_loads}), "
                         f"refused {rec.refused_admissions}; " + "; ".join(rec.events[-4:]))
        return "\n  ".join(lines) or "(none)"


def _call_optional(connector, name: str, *args, default=None):
    """A hook the real base class always has; a duck-typed stand-in (the overhead benchmark's) may lack it."""
    fn = getattr(connector, name, None)
    return fn(*args) if fn is not None else default
