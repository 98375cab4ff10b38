"""Puts the pieces together: a real sidecar process, the scheduler-role connector in this process,
N worker processes (spawned, each with real torch CPU KV tensors), and vLLM's step loop."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fake_engine.sidecar import REPO, SidecarProcess, sidecar_bin  # noqa: F401 - the launcher, re-exported for callers

SHIM = os.path.join(REPO, "python_shim")
FAKES = os.path.join(SHIM, "tests", "fakes")


def ensure_import_paths() -> List[str]:
    """The shim, the integration package and, unless a real vLLM is importable, the vLLM fakes."""
    paths = [SHIM, os.path.join(REPO, "integration")]
    if not real_vllm_installed():
        paths.append(FAKES)
    for p in paths:
        if p not in sys.path:
            sys.path.insert(0, p)
    return paths


def real_vllm_installed() -> bool:
    """Whether a real vLLM package is importable (not our fake, not the namespace package that the
    integration/vllm test folder would otherwise pose as)."""
    import importlib.util

    if "vllm" in sys.modules:
        module = sys.modules["vllm"]
        return getattr(module, "__file__", None) is not None and not getattr(module, "__version__", "").endswith("+fake")
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None and not spec.origin.startswith(FAKES)


@dataclass
class EngineOptions:
    era: str = "blocks_first"
    tp: int = 1
    runner: str = "v2"
    num_blocks: int = 64
    block_size: int = 16
    num_layers: int = 4
    num_heads: int = 2
    head_size: int = 8
    chunk_tokens: int = 64
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    enable_prefix_caching: bool = False
    kv_load_failure_policy: str = "recompute"
    extra_config: Dict = field(default_factory=dict)
    use_mla: bool = False


def sample_token(req) -> int:
    """The "model's" next token: deterministic in the request's tokens so far."""
    return (sum(req.all_token_ids[-8:]) * 2654435761 + req.num_tokens) % 30000 + 1000


class FakeEngine:
    def __init__(self, socket_path: str, opts: EngineOptions, engine_id: Optional[str] = None):
        ensure_import_paths()
        import torch
        from vllm.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
        from vllm.config.kv_transfer import KVTransferConfig
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, MLAAttentionSpec

        from csharp_kv import vllm_plugin
        from fake_engine.model import Geometry

        vllm_plugin.register()
        self.opts = opts
        extra = {"socket_path": socket_path, "chunk_tokens": opts.chunk_tokens, "retry_interval_ms": 200,
                 "transfer_timeout_ms": 5000, **opts.extra_config}
        kvt = KVTransferConfig(kv_connector="csharp-sidecar", kv_role="kv_both", kv_connector_extra_config=extra,
                               engine_id=engine_id or f"engine-{uuid.uuid4().hex[:8]}",
                               kv_load_failure_policy=opts.kv_load_failure_policy)
        self.vllm_config = VllmConfig(model_config=ModelConfig(model="fake/llama-tiny", use_mla=opts.use_mla),
                                      cache_config=CacheConfig(block_size=opts.block_size),
                                      parallel_config=ParallelConfig(tensor_parallel_size=opts.tp),
                                      scheduler_config=SchedulerConfig(opts.max_num_batched_tokens, opts.max_num_seqs),
                                      kv_transfer_config=kvt)
        spec_cls = MLAAttentionSpec if opts.use_mla else FullAttentionSpec
        spec = spec_cls(opts.block_size, 1 if opts.use_mla else opts.num_heads, opts.head_size, torch.float16)
        self.kv_cache_config = KVCacheConfig(opts.num_blocks, [], [KVCacheGroupSpec(
            [f"model.layers.{i}.self_attn.attn" for i in range(opts.num_layers)], spec)])
        self.geometry = Geometry(opts.num_layers, opts.num_blocks, opts.block_size, opts.num_heads, opts.head_size)
        self.connector = KVConnectorFactory.create_connector(self.vllm_config, KVConnectorRole.SCHEDULER, self.kv_cache_config)
        from fake_engine.scheduler import FakeScheduler

        self.scheduler = FakeScheduler(self.connector, opts.block_size, opts.num_blocks, opts.max_num_batched_tokens,
                                       opts.max_num_seqs, opts.enable_prefix_caching, opts.runner,
                                       opts.kv_load_failure_policy)
        self.workers = []
        ctx = mp.get_context("spawn")
        from fake_engine.worker import worker_main

        paths = ensure_import_paths()
        for rank in range(opts.tp):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, self.vllm_config, self.kv_cache_config, rank, opts.era,
                                                         self.geometry, opts.runner, paths), daemon=True)
            proc.start()
            self.workers.append((proc, parent))
        for proc, conn in self.workers:
            status, detail = conn.recv()
            if status != "ready":
                raise RuntimeError(f"worker failed to start:\n{detail}")
        self.mismatches: List[str] = []
        self.steps = 0
        self.step_seconds = 0.0
        self._reported: Dict[str, Dict[str, int]] = {}

    def add(self, req) -> None:
        self.scheduler.add_request(req)

    def step(self):
        from vllm.v1.outputs import KVConnectorOutput

        t0 = time.perf_counter()
        so = self.scheduler.schedule()
        self.step_seconds += time.perf_counter() - t0
        for _, conn in self.workers:
            conn.send(("step", so))
        results = []
        for _, conn in self.workers:
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(f"worker step failed:\n{value}")
            results.append(value)
        # KVOutputAggregator: an id counts once every worker reported it, in this step or an earlier one.
        world = self.connector.get_finished_count() or len(self.workers)
        out = KVConnectorOutput(expected_finished_count=world)
        for key in ("finished_sending", "finished_recving"):
            counts = self._reported.setdefault(key, {})
            done = set()
            for r in results:
                for req_id in r[key]:
                    counts[req_id] = counts.get(req_id, 0) + 1
                    if counts[req_id] == world:
                        done.add(req_id)
                        del counts[req_id]
            setattr(out, key, done or None)
        for r in results:
            out.invalid_block_ids |= r["invalid_block_ids"]
            self.mismatches.extend(r["mismatches"])
        t0 = time.perf_counter()
        self.scheduler.update_from_output(so, out, sample_token)
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        return so, out

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_work():
                return
            self.step()
        raise TimeoutError("the engine did not finish its requests")

    def worker_stats(self) -> List[dict]:
        out = []
        for _, conn in self.workers:
            conn.send(("stats", None))
            out.append(conn.recv()[1])
        return out

    def close(self) -> None:
        for proc, conn in self.workers:
            try:
                conn.send(("shutdown", None))
                conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.connector.shutdown()
