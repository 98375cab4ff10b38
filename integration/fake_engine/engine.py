"""Puts the pieces together: a real sidecar process, the scheduler-role connector in this process,
N worker processes (each with real torch CPU KV tensors), vLLM's output aggregator and its step loop, in
the call order of the vLLM version ``EngineOptions.api`` names (``v029`` or ``newest``, see api.py)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from fake_engine import api as fake_api
from fake_engine.errors import BlockLeak, EngineStuck
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
    # kv_connector_extra_config on top of the engine's defaults; a None value removes a default key.
    extra_config: Dict = field(default_factory=dict)
    use_mla: bool = False
    # "v029" or "newest"; None: $FAKE_VLLM_API as this process started with, else v029.
    api: Optional[str] = None
    # Newest only: refuse each request's first async admission and every K-th after it (as the reservation check may).
    refuse_async_admission_every: int = 0
    # Newest only: the local prefix cache also keeps finished requests' partial tail blocks.
    local_partial_tail: bool = False
    # Newest MR V1 only: speculative decoding, wait_for_save and clear after get_transfer_results.
    defer_finalize: bool = False
    # Bounds of one run(): steps (idle ones included), seconds, and external hits given to one request.
    max_steps: int = 5000
    max_seconds: float = 60.0
    max_load_attempts: int = 16
    # Where the workers' KV lives: "host" (CPU tensors) or a path to the CUDA driver double (tests/cuda_double):
    # the KV is then "device" memory of the double, exported to the sidecar through CUDA IPC handles.
    kv_memory: str = "host"
    # (module path, class name) of another connector (the harness self-tests); None: csharp-sidecar.
    connector: Optional[Tuple[str, str]] = None
    # Keep every step's worker-side connector calls, in order (engine.call_log).
    record_calls: bool = False


def sample_token(req) -> int:
    """The "model's" next token: deterministic in the request's tokens so far."""
    return (sum(req.all_token_ids[-8:]) * 2654435761 + req.num_tokens) % 30000 + 1000


def _mp_context():
    """Workers start from a fork server that has torch imported already (a fresh interpreter per worker, as
    vLLM's spawn, without paying torch's import each time); FAKE_ENGINE_MP=spawn starts each one from scratch."""
    if os.environ.get("FAKE_ENGINE_MP") == "spawn":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch"])
    return ctx


class KVOutputAggregator:
    """vLLM's aggregator: an id counts as finished once ``expected`` workers reported it, in any steps;
    invalid blocks and failed receives are unioned."""

    def __init__(self, expected: int):
        self.expected = expected
        self.reported: Dict[str, Dict[str, set]] = {"finished_sending": {}, "finished_recving": {}}
        self.violations: List[str] = []

    def aggregate(self, results: List[dict], output_cls, newest: bool):
        out = output_cls(expected_finished_count=self.expected)
        for key, reported in self.reported.items():
            done = set()
            for rank, r in enumerate(results):
                for req_id in r[key]:
                    ranks = reported.setdefault(req_id, set())
                    if rank in ranks:
                        self.violations.append(f"rank {rank} reported {req_id} in {key} again before every rank had")
                    ranks.add(rank)
                    if len(ranks) == self.expected:
                        del reported[req_id]
                        done.add(req_id)
            setattr(out, key, done or None)
        for r in results:
            out.invalid_block_ids |= r["invalid_block_ids"]
            if newest:
                out.failed_recving |= r["failed_recving"]
        return out


class FakeEngine:
    def __init__(self, socket_path: str, opts: EngineOptions, engine_id: Optional[str] = None):
        self.api = fake_api.activate(opts.api)
        self.newest = self.api == fake_api.NEWEST
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
        extra = {k: v for k, v in extra.items() if v is not None}
        name, module = "csharp-sidecar", None
        if opts.connector is not None:
            module, name = opts.connector
        kvt = KVTransferConfig(kv_connector=name, kv_connector_module_path=module, kv_role="kv_both",
                               kv_connector_extra_config=extra,
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
                                       opts.kv_load_failure_policy, api=self.api,
                                       refuse_async_admission_every=opts.refuse_async_admission_every,
                                       local_partial_tail=opts.local_partial_tail,
                                       max_load_attempts=opts.max_load_attempts)
        self.workers = []
        ctx = _mp_context()
        from fake_engine.worker import worker_main

        paths = ensure_import_paths()
        # The configs travel pickled, to be unpickled after the worker chose its vLLM version.
        payload = pickle.dumps((self.vllm_config, self.kv_cache_config, self.geometry))
        for rank in range(opts.tp):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, payload, rank, opts.era, opts.runner, paths, self.api,
                                                         opts.defer_finalize, opts.kv_memory), daemon=True)
            proc.start()
            child.close()
            self.workers.append((proc, parent))
        for proc, conn in self.workers:
            try:
                status, detail = conn.recv()
            except EOFError:
                status, detail = "error", f"the worker process exited (code {proc.exitcode})"
            if status != "ready":
                self.close()
                raise RuntimeError(f"worker failed to start:\n{detail}")
        # KVOutputAggregator.from_connector(connector, world_size)
        self.aggregator = KVOutputAggregator(self.connector.get_finished_count() or len(self.workers))
        self.mismatches: List[str] = []
        self.violations: List[str] = self.aggregator.violations
        self.steps = 0
        self.step_seconds = 0.0
        self.sched_step_seconds: List[float] = []      # schedule() + update_from_output() of each step
        self.worker_call_max: Dict[str, float] = {}    # the longest single call of each connector method, any rank
        self.step_wall_seconds: List[float] = []       # each step, workers included
        self.call_log: List[dict] = []                 # with record_calls: per step, each rank's calls in order
        # Called with the SchedulerOutput after schedule(), before the workers run the step (fault injection).
        self.on_scheduled: Optional[Callable] = None

    def add(self, req) -> None:
        self.scheduler.add_request(req)

    def step(self):
        from vllm.v1.outputs import KVConnectorOutput

        started = time.perf_counter()
        so = self.scheduler.schedule()
        sched_s = time.perf_counter() - started
        if self.on_scheduled is not None:
            self.on_scheduled(so)
        new, freed = self.scheduler.take_fresh_blocks()
        # What the engine took back: freed blocks, and in v029 the newly allocated ones (newest zeroes those itself).
        poison = freed if self.newest else freed | new
        for _, conn in self.workers:
            conn.send(("step", (so, {"poison": sorted(poison)})))
        results = []
        for _, conn in self.workers:
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(f"worker step failed:\n{value}")
            results.append(value)
        out = self.aggregator.aggregate(results, KVConnectorOutput, self.newest)
        for r in results:
            self.mismatches.extend(r["mismatches"])
            self.violations.extend(r["violations"])
            for name, seconds in r["call_seconds"].items():
                self.worker_call_max[name] = max(self.worker_call_max.get(name, 0.0), seconds)
        if self.opts.record_calls:
            self.call_log.append({"step": self.scheduler.step_index, "scheduled": so.total_num_scheduled_tokens,
                                  "sync_loads": so.has_sync_kv_loads, "ranks": [r["call_order"] for r in results]})
        t0 = time.perf_counter()
        self.scheduler.update_from_output(so, out, sample_token)
        sched_s += time.perf_counter() - t0
        self.sched_step_seconds.append(sched_s)
        self.step_seconds += sched_s
        self.step_wall_seconds.append(time.perf_counter() - started)
        self.steps += 1
        return so, out

    def pending(self) -> bool:
        """Whether the engine keeps stepping: unfinished requests, finished ids to ship, blocks held for a
        transfer (delayed frees), or push work the connector reports."""
        if self.scheduler.has_work() or self.scheduler.has_pending_transfers():
            return True
        push = getattr(self.connector, "has_pending_push_work", None)
        return bool(push and push())

    def run(self, max_steps: Optional[int] = None, max_seconds: Optional[float] = None) -> None:
        """Steps until every request finished and every transfer reported (steps with nothing scheduled
        included, as vLLM's busy loop does), then checks that every block is free again."""
        max_steps = max_steps or self.opts.max_steps
        max_seconds = max_seconds or self.opts.max_seconds
        deadline = time.monotonic() + max_seconds
        steps = 0
        while self.pending():
            if steps >= max_steps or time.monotonic() > deadline:
                raise EngineStuck(f"the engine did not finish its requests within {steps} steps / {max_seconds:.0f} s "
                                  f"(api {self.api}); still held:\n  {self.scheduler.describe()}")
            so, _ = self.step()
            steps += 1
            if so.total_num_scheduled_tokens == 0:
                time.sleep(0.001)  # an idle step: transfers are in flight
        self.check_drained()

    def check_drained(self) -> None:
        """No request left: every block must be free (delayed frees released by finished_sending)."""
        s = self.scheduler
        if s.requests:
            return
        if not s.pool.all_free():
            held = [b for b, r in enumerate(s.pool.refs) if r]
            raise BlockLeak(f"block leak: no request is left, yet blocks {held} are still allocated "
                            f"({len(s.pool.free)} of {s.pool.num_gpu_blocks} free); requests whose blocks were held: "
                            f"{sorted(s.blocks)}")

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
                if conn.poll(10):
                    conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.workers = []
        connector = getattr(self, "connector", None)
        if connector is not None:
            connector.shutdown()
