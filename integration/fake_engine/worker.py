"""A worker process: owns real torch KV tensors, runs the connector's worker role in the order of Model Runner
V1 or V2 of the chosen vLLM version, writes the model's KV for computed tokens, and checks every loaded block
byte for byte when the forward reads it.

``api="v029"`` (engines.md 1.5), a step:

* V2: handle_preemptions(meta) -> bind -> start_load_kv(ctx) before the forward if the step has sync loads ->
  layer hooks -> deferred start_load_kv(ctx) -> [forward steps only] wait_for_save -> get_finished ->
  get_block_ids_with_load_errors -> stats -> events -> build_connector_worker_meta -> clear;
* V1: bind -> start_load_kv(ctx) -> layer hooks -> [forward steps only] wait_for_save -> get_finished ->
  get_block_ids_with_load_errors -> stats -> clear.

``api="newest"`` (engines-drift.md 2.2-2.3), a step:

* V2: handle_preemptions(meta) -> bind -> zero new blocks -> start_load_kv(ctx, **kwargs) only if the step has
  sync loads -> layer hooks -> finish_forward -> start_load_kv(ctx, **kwargs) if not started -> wait_for_save
  (every step, empty ones too) -> get_transfer_results(finished_req_ids) -> get_block_ids_with_load_errors ->
  stats -> events -> build_connector_worker_meta -> clear;
* V1: bind -> zero new blocks -> start_load_kv before the forward only with sync loads, else after it ->
  wait_for_save -> get_transfer_results -> errors -> stats -> events -> worker meta -> clear; with
  ``defer_finalize`` (speculative decoding) wait_for_save and clear come after get_transfer_results, in
  finalize_kv_connector() after the draft forward. No handle_preemptions in the V1 mixin.

In both versions the harness also poisons, after handle_preemptions/bind and before any load of the step, the
blocks the scheduler freed since the last step (and, in v029, the newly allocated ones): a transfer that still
reads or writes a block after the engine took it back shows up as wrong bytes in a later load."""

from __future__ import annotations

import os
import time
import traceback
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from .model import Geometry, copy_blocks, fill_blocks, kv_values, kv_views, make_copy_blocks_op, make_kv_caches

POISON = -3.5  # never a value of kv_values (those are >= 0)


class FakeWorker:
    def __init__(self, vllm_config, kv_cache_config, rank: int, era: str, geometry: Geometry, runner: str,
                 api: str = "v029", defer_finalize: bool = False):
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        from csharp_kv import vllm_plugin
        from vllm.plugins import load_general_plugins

        # vLLM loads general plugins in every worker; the entry point exists once the shim is pip-installed,
        # so register the short name directly as well (idempotent).
        load_general_plugins()
        vllm_plugin.register()
        vllm_config.parallel_config.rank = rank
        self.rank = rank
        self.era = era
        self.g = geometry
        self.runner = runner
        self.api = api
        self.newest = api == "newest"
        self.defer_finalize = defer_finalize and self.newest and runner == "v1"
        self.calls = {}
        self.order = []
        self.connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
        c = self.connector
        if self.newest:
            pool_ctx = self._call("get_mem_pool_context", c.get_mem_pool_context)
            with pool_ctx if pool_ctx is not None else nullcontext():
                self.kv_caches = make_kv_caches(era, geometry)
        else:
            self.kv_caches = make_kv_caches(era, geometry)
        self._call("register_kv_caches", c.register_kv_caches, self.kv_caches)
        self._call("set_host_xfer_buffer_ops", c.set_host_xfer_buffer_ops, make_copy_blocks_op(era, geometry))
        if self.newest and runner == "v2":
            self._call("reset_capture_state", c.reset_capture_state)  # after CUDA-graph capture
        self.tokens = {}     # req_id -> all token ids known to this worker
        self.blocks = {}     # req_id -> block ids
        self.finished_seen = set()  # every id passed in finished_req_ids so far

    def _call(self, name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            self.calls[name] = max(self.calls.get(name, 0.0), dt)
            self.order.append(name)

    # ------------------------------------------------------------------ one engine step

    def step(self, so, extras=None) -> dict:
        from vllm.forward_context import ForwardContext

        extras = extras or {}
        self.calls = {}
        self.order = []
        self.violations = []
        c = self.connector
        meta = so.kv_connector_metadata
        has_forward = so.total_num_scheduled_tokens > 0
        ctx = ForwardContext(attn_metadata={} if has_forward else None)
        kwargs = {"input_batch": SimpleNamespace(req_ids=list(so.num_scheduled_tokens), num_reqs=len(so.num_scheduled_tokens)),
                  "attn_metadata": ctx.attn_metadata} if self.newest else {}
        if self.runner == "v2":
            self._call("handle_preemptions", c.handle_preemptions, meta)
        self._call("bind_connector_metadata", c.bind_connector_metadata, meta)
        self._prepare_blocks(so, extras)
        self._track(so)
        # Sync loads start before the forward (v029 V1: every load does).
        started = False
        if so.has_sync_kv_loads or (self.runner == "v1" and not self.newest):
            self._call("start_load_kv", c.start_load_kv, ctx, **kwargs)
            started = True
        first_bad = {}
        if has_forward:
            if ctx.attn_metadata is not None and c.has_connector_metadata():
                for name in self.kv_caches:
                    self._call("wait_for_layer_load", c.wait_for_layer_load, name)
                    self._call("save_kv_layer", c.save_kv_layer, name, self.kv_caches[name], ctx.attn_metadata)
            # What the attention layers read: the prefix every new or resumed request starts from.
            first_bad = self._check_loaded(so)
            self._compute(so)
        if self.newest and self.runner == "v2":
            self._call("finish_forward", c.finish_forward)
        if not started:
            self._call("start_load_kv", c.start_load_kv, ctx, **kwargs)
        deferred_finalize = self.defer_finalize and has_forward
        if (has_forward or self.newest) and not deferred_finalize:
            self._call("wait_for_save", c.wait_for_save)
        self.finished_seen |= set(so.finished_req_ids)
        failed = set()
        if self.newest:
            res = self._call("get_transfer_results", c.get_transfer_results, set(so.finished_req_ids))
            sending, recving = set(res.finished_sending or ()), set(res.finished_recving or ())
            failed = set(res.failed_recving or ())
            if failed - recving:
                self.violations.append(f"rank {self.rank}: failed_recving {sorted(failed - recving)} missing from "
                                       "finished_recving (failed receives must be in both)")
            if res.prefix_replay_checkpoints:
                self.violations.append(f"rank {self.rank}: prefix_replay_checkpoints without SWA prefix replay")
        else:
            sending, recving = self._call("get_finished", c.get_finished, set(so.finished_req_ids))
            sending, recving = set(sending or ()), set(recving or ())
        if sending - self.finished_seen:
            self.violations.append(f"rank {self.rank}: finished_sending {sorted(sending - self.finished_seen)} before "
                                   "those ids were passed in finished_req_ids")
        invalid = set(self._call("get_block_ids_with_load_errors", c.get_block_ids_with_load_errors) or ())
        self._call("get_kv_connector_stats", c.get_kv_connector_stats)
        if self.runner == "v2" or self.newest:
            self._call("get_kv_connector_kv_cache_events", c.get_kv_connector_kv_cache_events)
            self._call("build_connector_worker_meta", c.build_connector_worker_meta)
        if deferred_finalize:
            # finalize_kv_connector() after the draft forward: the metadata is still bound.
            self._call("wait_for_save", c.wait_for_save)
        self._call("clear_connector_metadata", c.clear_connector_metadata)
        mismatches = self._mismatches(so, first_bad, invalid)
        return {"finished_sending": sending, "finished_recving": recving, "failed_recving": failed,
                "invalid_block_ids": invalid, "mismatches": mismatches, "violations": self.violations,
                "call_seconds": dict(self.calls), "call_order": list(self.order)}

    def _prepare_blocks(self, so, extras) -> None:
        """Before any load of the step: newest zeroes new blocks (never those an async load fills) and applies
        block copies; the harness poisons what the engine took back from the previous step's owners."""
        poison = set(extras.get("poison", ()))
        if poison:
            fill_blocks(self.kv_caches, self.era, self.g, sorted(poison), POISON)
        if self.newest:
            if so.new_block_ids_to_zero:
                fill_blocks(self.kv_caches, self.era, self.g, so.new_block_ids_to_zero, 0.0)
            if so.kv_cache_block_copies:
                copy_blocks(self.kv_caches, self.era, self.g, so.kv_cache_block_copies)

    def _track(self, so) -> None:
        for new in so.scheduled_new_reqs:
            self.tokens[new.req_id] = list(new.prefill_token_ids or new.prompt_token_ids)
            self.blocks[new.req_id] = list(new.block_ids[0])
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self.blocks[req_id] = list(ids[0]) if ids else []
            elif ids is not None:
                self.blocks.setdefault(req_id, []).extend(ids[0])
            if req_id in cached.all_token_ids:
                self.tokens[req_id] = list(cached.all_token_ids[req_id])
            elif cached.new_token_ids and i < len(cached.new_token_ids):
                self.tokens.setdefault(req_id, []).extend(cached.new_token_ids[i])
        for req_id in so.finished_req_ids:
            self.tokens.pop(req_id, None)
            self.blocks.pop(req_id, None)

    def _slots(self, req_id, start, end):
        blocks = self.blocks[req_id]
        bs = self.g.block_size
        return [(blocks[p // bs], p % bs) for p in range(start, end)]

    def _compute(self, so) -> None:
        """The forward pass: KV of the scheduled tokens lands in their slots."""
        starts = {new.req_id: new.num_computed_tokens for new in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            starts[req_id] = cached.num_computed_tokens[i]
        for req_id, start in starts.items():
            n = so.num_scheduled_tokens.get(req_id, 0)
            if n == 0:
                continue
            self._write(req_id, start, start + n)

    def _write(self, req_id, start, end) -> None:
        tokens = torch.tensor(self.tokens[req_id][start:end])
        positions = torch.arange(start, end)
        slots = self._slots(req_id, start, end)
        b = torch.tensor([s[0] for s in slots])
        o = torch.tensor([s[1] for s in slots])
        for layer, name in enumerate(self.kv_caches):
            k, v = kv_views(self.kv_caches[name], self.era, self.g)
            k[b, o] = kv_values(tokens, positions, layer, 0, self.rank, self.g)
            v[b, o] = kv_values(tokens, positions, layer, 1, self.rank, self.g)

    def _check_loaded(self, so) -> dict:
        """req_id -> the first token position whose KV is wrong, for every new or resumed request that starts
        from computed tokens (local hits and loads), as the forward reads them."""
        first_bad = {}
        for new in so.scheduled_new_reqs:
            n = new.num_computed_tokens
            if n == 0:
                continue
            tokens = torch.tensor(self.tokens[new.req_id][:n])
            positions = torch.arange(n)
            slots = self._slots(new.req_id, 0, n)
            b = torch.tensor([s[0] for s in slots])
            o = torch.tensor([s[1] for s in slots])
            bad = n
            for layer, name in enumerate(self.kv_caches):
                k, v = kv_views(self.kv_caches[name], self.era, self.g)
                ok_k = (k[b, o] == kv_values(tokens, positions, layer, 0, self.rank, self.g)).flatten(1).all(1)
                ok_v = (v[b, o] == kv_values(tokens, positions, layer, 1, self.rank, self.g)).flatten(1).all(1)
                wrong = (~(ok_k & ok_v)).nonzero()
                if len(wrong):
                    bad = min(bad, int(wrong[0]))
            if bad < n:
                first_bad[new.req_id] = (bad, n)
        return first_bad

    def _mismatches(self, so, first_bad: dict, invalid: set) -> list:
        """Wrong bytes before the first block the connector reported as failed (vLLM recomputes from there)."""
        problems = []
        bs = self.g.block_size
        for req_id, (bad, n) in first_bad.items():
            blocks = self.blocks.get(req_id, [])
            good_end = n
            for p in range(0, n, bs):
                if blocks[p // bs] in invalid:
                    good_end = p
                    break
            if bad < good_end:
                block = blocks[bad // bs]
                problems.append(f"rank {self.rank}: {req_id} holds wrong KV at token {bad} (block {block}) of the "
                                f"{n} it starts from" + (" (poisoned: a transfer used the block after the engine "
                                                          "took it back)" if self._poisoned(block) else ""))
        return problems

    def _poisoned(self, block: int) -> bool:
        k, _ = kv_views(next(iter(self.kv_caches.values())), self.era, self.g)
        return bool((k[block] == POISON).any())


def worker_main(conn, payload, rank, era, runner, sys_path, api="v029", defer_finalize=False, kv_memory="host") -> None:
    """Entry point of a worker process: commands arrive over a pipe. ``api`` is set in the environment before
    anything imports the fake vllm; ``payload`` is the pickled (vllm_config, kv_cache_config, geometry);
    ``kv_memory`` is "host" or the path of the CUDA driver double to take the KV memory from."""
    import pickle
    import sys

    os.environ["FAKE_VLLM_API"] = api
    if kv_memory != "host":
        from .model import use_cuda_double

        use_cuda_double(kv_memory)
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    try:
        from fake_engine import api as fake_api

        fake_api.activate(api)
        vllm_config, kv_cache_config, geometry = pickle.loads(payload)
        worker = FakeWorker(vllm_config, kv_cache_config, rank, era, geometry, runner, api, defer_finalize)
        conn.send(("ready", None))
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            cmd, arg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if cmd == "step":
                so, extras = arg
                conn.send(("ok", worker.step(so, extras)))
            elif cmd == "stats":
                stats = getattr(worker.connector, "stats", None)
                conn.send(("ok", stats() if stats else {}))
            elif cmd == "shutdown":
                worker.connector.shutdown()
                conn.send(("ok", None))
                return
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
