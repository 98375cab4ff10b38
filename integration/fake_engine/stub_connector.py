"""A programmable connector with no sidecar, for the fake engine's self-tests (integration/test_fake_engine.py):
it answers lookups with a fixed hit, "loads" by writing the model's exact KV itself, can fail loads, delay
frees, and misreport on purpose, and records every scheduler-side call. Behaviour comes from
``kv_connector_extra_config`` (so that every worker process builds the same one):

* ``hit_tokens``: tokens every prompt is "cached" for (capped to leave a token, block-aligned);
* ``async_load``: answer hits as async loads;
* ``not_yet``: answer ``(None, False)`` this many times per request first;
* ``fail_loads``: the first N loads a worker runs fail (their blocks are left untouched);
* ``fail_report``: how a failed async load is reported: ``"blocks"`` (get_block_ids_with_load_errors, as in
  v0.29) or ``"failed_recving"`` (newest);
* ``reoffer_after_failure``: keep offering a hit whose load failed (the livelock);
* ``delay_free``: ``request_finished`` returns True; each worker then reports the id in finished_sending
  ``sending_after`` get_finished calls (a list: one entry per rank) after it arrived in finished_req_ids;
  ``never_send`` never reports it;
* ``send_undelayed``: report finished_sending for every finished request although request_finished said False.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:  # v0.29
    KVConnectorTransferResults = None


@dataclass
class StubLoad:
    req_id: str
    tokens: List[int]
    block_ids: List[int]
    start: int
    end: int
    is_async: bool


@dataclass
class StubMetadata(KVConnectorMetadata):
    loads: List[StubLoad] = field(default_factory=list)


class StubConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config):
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = dict(vllm_config.kv_transfer_config.kv_connector_extra_config)
        self.cfg = cfg
        self.bs = vllm_config.cache_config.block_size
        self.rank = getattr(vllm_config.parallel_config, "rank", 0)
        self.log: List[tuple] = []
        # scheduler side
        self.asked = {}
        self.last_computed = {}
        self.load_blocks = {}
        self.failed = set()
        self.pending: List[StubLoad] = []
        # worker side
        self.kv_caches = None
        self.loads_run = 0
        self.done_recving = set()
        self.failed_async = set()
        self.async_blocks = {}
        self.errors = set()
        self.countdown = {}
        self.spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        self.num_layers = len(kv_cache_config.kv_cache_groups[0].layer_names)
        self.num_blocks = kv_cache_config.num_blocks

    # ------------------------------------------------------------------ scheduler role

    def bind_gpu_block_pool(self, gpu_block_pool) -> None:
        self.log.append(("bind_gpu_block_pool", type(gpu_block_pool).__name__))

    def on_new_request(self, request) -> None:
        self.log.append(("on_new_request", request.request_id))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        req_id = request.request_id
        self.log.append(("lookup", req_id, num_computed_tokens))
        asked = self.asked.get(req_id, 0)
        if asked < self.cfg.get("not_yet", 0):
            self.asked[req_id] = asked + 1
            return None, False
        if req_id in self.failed and not self.cfg.get("reoffer_after_failure", False):
            return 0, False
        cap = ((request.num_tokens - 1) // self.bs) * self.bs
        hit = min(self.cfg.get("hit_tokens", 0), cap)
        ext = max(0, hit - num_computed_tokens)
        self.last_computed[req_id] = num_computed_tokens
        return ext, bool(self.cfg.get("async_load", False) and ext > 0)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        req_id = request.request_id
        ids = list(blocks.get_block_ids()[0])
        self.log.append(("alloc", req_id, len(ids), num_external_tokens))
        if num_external_tokens == 0:
            return
        start = self.last_computed[req_id]
        end = start + num_external_tokens
        block_ids = ids[:-(-end // self.bs)]
        self.load_blocks[req_id] = set(block_ids[start // self.bs:])
        self.pending.append(StubLoad(req_id, list(request.all_token_ids[:end]), block_ids, start, end,
                                     bool(self.cfg.get("async_load", False))))

    def build_connector_meta(self, scheduler_output) -> StubMetadata:
        meta, self.pending = StubMetadata(self.pending), []
        self.log.append(("build_connector_meta", len(meta.loads)))
        return meta

    def update_connector_output(self, connector_output) -> None:
        failed = set(getattr(connector_output, "failed_recving", None) or ())
        for req_id, blocks in self.load_blocks.items():
            if blocks & connector_output.invalid_block_ids:
                failed.add(req_id)
        self.failed |= failed
        self.log.append(("update_connector_output", sorted(connector_output.finished_recving or ()),
                         sorted(connector_output.finished_sending or ()), sorted(failed)))

    def request_finished(self, request, block_ids):
        self.log.append(("request_finished", request.request_id, list(block_ids)))
        return bool(self.cfg.get("delay_free", False) and block_ids), None

    def get_kv_connector_stats(self):
        self.log.append(("get_kv_connector_stats",))
        return None

    # ------------------------------------------------------------------ worker role

    def register_kv_caches(self, kv_caches) -> None:
        self.kv_caches = kv_caches

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._connector_metadata
        self.log.append(("start_load_kv", sorted(kwargs)))
        for op in getattr(meta, "loads", ()):
            failing = self.loads_run < self.cfg.get("fail_loads", 0)
            self.loads_run += 1
            if failing:
                if op.is_async:
                    self.failed_async.add(op.req_id)
                    self.async_blocks[op.req_id] = set(op.block_ids[op.start // self.bs:])
                else:
                    self.errors |= set(op.block_ids[op.start // self.bs:])
            else:
                self._write(op)
            if op.is_async:
                self.done_recving.add(op.req_id)

    def _write(self, op: StubLoad) -> None:
        import torch

        from fake_engine.model import Geometry, kv_values, kv_views

        g = Geometry(self.num_layers, self.num_blocks, self.bs, self.spec.num_kv_heads, self.spec.head_size)
        era = self.cfg.get("era", "blocks_first")
        positions = torch.arange(op.start, op.end)
        tokens = torch.tensor(op.tokens[op.start:op.end])
        b = torch.tensor([op.block_ids[p // self.bs] for p in range(op.start, op.end)])
        o = torch.tensor([p % self.bs for p in range(op.start, op.end)])
        for layer, name in enumerate(self.kv_caches):
            k, v = kv_views(self.kv_caches[name], era, g)
            k[b, o] = kv_values(tokens, positions, layer, 0, self.rank, g)
            v[b, o] = kv_values(tokens, positions, layer, 1, self.rank, g)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def _collect(self, finished_req_ids):
        """(finished sending, finished receiving, failed async loads among those) of this call."""
        sending = set()
        after = self.cfg.get("sending_after", [1])
        for req_id in finished_req_ids:
            if self.cfg.get("send_undelayed"):
                sending.add(req_id)
            elif self.cfg.get("delay_free") and not self.cfg.get("never_send"):
                self.countdown[req_id] = after[self.rank % len(after)]
        for req_id in list(self.countdown):
            self.countdown[req_id] -= 1
            if self.countdown[req_id] <= 0:
                del self.countdown[req_id]
                sending.add(req_id)
        recving, self.done_recving = self.done_recving, set()
        failed = self.failed_async & recving
        self.failed_async -= failed
        return sending, recving, failed

    def _report_blocks(self, failed) -> None:
        for req_id in failed:
            self.errors |= self.async_blocks.pop(req_id, set())

    def get_finished(self, finished_req_ids):
        sending, recving, failed = self._collect(finished_req_ids)
        self._report_blocks(failed)  # v0.29: a failed async load is finished, with its blocks as load errors
        return sending or None, recving or None

    if KVConnectorTransferResults is not None:
        def get_transfer_results(self, finished_req_ids):
            sending, recving, failed = self._collect(finished_req_ids)
            if self.cfg.get("fail_report", "blocks") != "failed_recving":
                self._report_blocks(failed)
                failed = set()
            return KVConnectorTransferResults(sending, recving, failed)

    def get_block_ids_with_load_errors(self):
        errors, self.errors = self.errors, set()
        return errors

    def stats(self) -> dict:
        return {"log": list(self.log)}
