"""A worker process: owns real torch KV tensors, runs the connector's worker role in Model Runner V1 or
V2 order, writes the model's KV for computed tokens, and checks every loaded block byte for byte."""

from __future__ import annotations

import traceback

import torch

from .model import Geometry, kv_values, kv_views, make_kv_caches


class FakeWorker:
    def __init__(self, vllm_config, kv_cache_config, rank: int, era: str, geometry: Geometry, runner: str):
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
        self.kv_caches = make_kv_caches(era, geometry)
        self.connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
        self.connector.register_kv_caches(self.kv_caches)
        self.tokens = {}     # req_id -> all token ids known to this worker
        self.blocks = {}     # req_id -> block ids

    def step(self, so) -> dict:
        from vllm.forward_context import ForwardContext

        c = self.connector
        meta = so.kv_connector_metadata
        has_forward = so.total_num_scheduled_tokens > 0
        if self.runner == "v2":
            c.handle_preemptions(meta)
        c.bind_connector_metadata(meta)
        ctx = ForwardContext(attn_metadata={} if has_forward else None)
        deferred = self.runner == "v2" and not so.has_sync_kv_loads
        if not deferred:
            c.start_load_kv(ctx)
        self._track(so)
        if has_forward:
            for name in self.kv_caches:
                c.wait_for_layer_load(name)
                c.save_kv_layer(name, self.kv_caches[name], ctx.attn_metadata)
        if deferred:
            c.start_load_kv(ctx)
        if has_forward:
            self._compute(so)
            c.wait_for_save()
        sending, recving = c.get_finished(so.finished_req_ids)
        invalid = c.get_block_ids_with_load_errors()
        # The forward wrote only positions past num_computed_tokens, so the loaded prefix can be checked now,
        # skipping blocks the connector reported as failed (vLLM recomputes those).
        mismatches = self._verify_loaded(so, invalid)
        c.get_kv_connector_stats()
        if self.runner == "v2":
            c.get_kv_connector_kv_cache_events()
            c.build_connector_worker_meta()
        c.clear_connector_metadata()
        return {"finished_sending": sending or set(), "finished_recving": recving or set(),
                "invalid_block_ids": set(invalid), "mismatches": mismatches, "stats": c.stats()}

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

    def _verify_loaded(self, so, invalid) -> list:
        """Every block a new or resumed request starts from must hold exactly the model's KV."""
        problems = []
        bs = self.g.block_size
        for new in so.scheduled_new_reqs:
            n = new.num_computed_tokens
            if n == 0:
                continue
            blocks = self.blocks[new.req_id]
            good_end = n
            for p in range(0, n, bs):
                if blocks[p // bs] in invalid:
                    good_end = p
                    break
            if good_end == 0:
                continue
            tokens = torch.tensor(self.tokens[new.req_id][:good_end])
            positions = torch.arange(good_end)
            slots = self._slots(new.req_id, 0, good_end)
            b = torch.tensor([s[0] for s in slots])
            o = torch.tensor([s[1] for s in slots])
            for layer, name in enumerate(self.kv_caches):
                k, v = kv_views(self.kv_caches[name], self.era, self.g)
                if not torch.equal(k[b, o], kv_values(tokens, positions, layer, 0, self.rank, self.g)) or \
                        not torch.equal(v[b, o], kv_values(tokens, positions, layer, 1, self.rank, self.g)):
                    problems.append(f"rank {self.rank}: {new.req_id} layer {layer} holds wrong KV in [0, {good_end})")
                    break
        return problems


def worker_main(conn, vllm_config, kv_cache_config, rank, era, geometry, runner, sys_path) -> None:
    """Entry point of a spawned worker process: commands arrive over a pipe."""
    import sys

    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    try:
        worker = FakeWorker(vllm_config, kv_cache_config, rank, era, geometry, runner)
        conn.send(("ready", None))
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        cmd, arg = conn.recv()
        try:
            if cmd == "step":
                conn.send(("ok", worker.step(arg)))
            elif cmd == "stats":
                conn.send(("ok", worker.connector.stats()))
            elif cmd == "shutdown":
                worker.connector.shutdown()
                conn.send(("ok", None))
                return
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
