"""Pieces of integration/bench_connector_overhead.py: the fake engine's scheduler and an in-process worker
role stepping together against a real sidecar, no-op connectors for the baselines, per-call timing, and a
sidecar launcher that notes when READY was printed. Uses fake_engine as it is (constructors unchanged)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Dict, List, Optional, Tuple

from fake_engine.engine import ensure_import_paths, sample_token
from fake_engine.sidecar import SidecarProcess

ensure_import_paths()

from vllm.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.config.kv_transfer import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole  # noqa: E402
from vllm.forward_context import ForwardContext  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from csharp_kv.vllm.connector import CSharpSidecarConnector  # noqa: E402
from csharp_kv.vllm.metadata import CSharpSidecarMetadata  # noqa: E402
from fake_engine.model import Geometry, make_kv_caches  # noqa: E402
from fake_engine.scheduler import FakeScheduler  # noqa: E402

# The base class logs a warning per instance ("This API is experimental"): one per rig is noise here.
logging.getLogger("vllm.distributed.kv_transfer.kv_connector.v1.base").setLevel(logging.ERROR)

BLOCK = 16
CHUNK = 256


# ---------------------------------------------------------------------------------------------- statistics

def percentile(values: List[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def summary_us(seconds: List[float]) -> Dict[str, float]:
    """p50, p99, max and mean in microseconds, and the sample count."""
    us = [x * 1e6 for x in seconds]
    return {"p50_us": round(percentile(us, 50), 1), "p99_us": round(percentile(us, 99), 1),
            "max_us": round(max(us) if us else 0.0, 1), "mean_us": round(sum(us) / len(us), 1) if us else 0.0,
            "n": len(us)}


def tokens(n: int, seed: int) -> List[int]:
    """Deterministic token ids, distinct per seed (as integration/test_scenarios.prompt)."""
    return [(seed * 7919 + i * 104729 + (i * i) % 9973) % 30000 + 1000 for i in range(n)]


# ---------------------------------------------------------------------------------------------- the sidecar

class StampedSidecar(SidecarProcess):
    """A SidecarProcess that records ``ready_at`` (time.monotonic()) when its READY line was read."""

    ready_at: Optional[float] = None

    def _read_output(self, proc, ready) -> None:
        sidecar = self

        class _Stamp:
            def set(self) -> None:
                sidecar.ready_at = time.monotonic()
                ready.set()

        super()._read_output(proc, _Stamp())


# ---------------------------------------------------------------------------------------------- connectors

class NoopSchedulerConnector:
    """The scheduler-side calls FakeScheduler makes, doing nothing (the baseline)."""

    def on_new_request(self, r): pass
    def get_num_new_matched_tokens(self, r, n): return 0, False
    def update_state_after_alloc(self, r, b, n): pass
    def build_connector_meta(self, so): return CSharpSidecarMetadata()
    def request_finished(self, r, b): return False, None
    def update_connector_output(self, o): pass
    def take_events(self): return ()
    def shutdown(self): pass


class NoopWorkerConnector(KVConnectorBase_V1):
    """A worker-role connector that does nothing: bind/clear are the base class's, the rest return at once."""

    def start_load_kv(self, forward_context, **kwargs): return None
    def wait_for_layer_load(self, layer_name): return None
    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs): return None
    def wait_for_save(self): return None
    def get_num_new_matched_tokens(self, request, num_computed_tokens): return 0, False
    def update_state_after_alloc(self, request, blocks, num_external_tokens): return None
    def build_connector_meta(self, scheduler_output): return CSharpSidecarMetadata()


_SCHEDULER_CALLS = ("on_new_request", "get_num_new_matched_tokens", "update_state_after_alloc",
                    "build_connector_meta", "request_finished", "update_connector_output", "take_events")


class Timed:
    """Wraps a scheduler-role connector: accumulates the time spent inside every call the scheduler makes
    (``seconds``, and per method in ``by_method``), notes lookup hits (``hits``: (time, req_id, tokens)), and
    the duration of the first get_num_new_matched_tokens call of each request (``first_asks``: (seconds,
    answered)), the call that waits for the answer to the lookup sent by on_new_request."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0
        self.by_method: Dict[str, float] = {name: 0.0 for name in _SCHEDULER_CALLS}
        self.hits: List[Tuple[float, str, int]] = []
        self.first_asks: List[Tuple[float, bool]] = []
        self._asked = set()
        for name in _SCHEDULER_CALLS:
            setattr(self, name, self._wrap(name, getattr(inner, name)))

    def _wrap(self, name, target):
        by_method = self.by_method
        perf = time.perf_counter
        hit_hook = name == "get_num_new_matched_tokens"

        def call(*a, **k):
            t0 = perf()
            try:
                out = target(*a, **k)
            finally:
                dt = perf() - t0
                self.seconds += dt
                by_method[name] += dt
            if hit_hook:
                req_id = a[0].request_id
                if out[0]:
                    self.hits.append((time.monotonic(), req_id, out[0]))
                if req_id not in self._asked:
                    self._asked.add(req_id)
                    self.first_asks.append((dt, out[0] is not None))
            return out
        return call

    def __getattr__(self, name):
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------- the rig

class Rig:
    """FakeScheduler + a scheduler-role connector (timed) + an in-process worker role with real torch CPU KV
    tensors registered with the sidecar (tp=1: vLLM's UniProcExecutor runs the model runner in the engine
    core's process too). ``noop`` swaps both roles for no-op connectors."""

    def __init__(self, socket_path: Optional[str], num_blocks: int, max_num_batched_tokens: int, max_num_seqs: int,
                 noop: bool = False, extra: Optional[dict] = None, geometry: Optional[Geometry] = None,
                 engine_id: Optional[str] = None):
        self.noop = noop
        self.geometry = geometry or Geometry(num_layers=4, num_blocks=num_blocks, block_size=BLOCK, num_heads=2,
                                             head_size=8)
        cfg = {"socket_path": socket_path or "/nonexistent/kvsidecar.sock", "chunk_tokens": CHUNK, **(extra or {})}
        kvt = KVTransferConfig(kv_connector="csharp-sidecar", kv_role="kv_both", kv_connector_extra_config=cfg,
                               engine_id=engine_id or f"bench-{uuid.uuid4().hex[:8]}")
        self.vllm_config = VllmConfig(model_config=ModelConfig(model="bench/tiny"),
                                      cache_config=CacheConfig(block_size=BLOCK),
                                      parallel_config=ParallelConfig(tensor_parallel_size=1),
                                      scheduler_config=SchedulerConfig(max_num_batched_tokens, max_num_seqs),
                                      kv_transfer_config=kvt)
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        import torch

        g = self.geometry
        spec = FullAttentionSpec(BLOCK, g.num_heads, g.head_size, torch.float16)
        self.kv_cache_config = KVCacheConfig(num_blocks, [], [KVCacheGroupSpec(
            [f"model.layers.{i}.self_attn.attn" for i in range(g.num_layers)], spec)])
        if noop:
            self.scheduler_connector = NoopSchedulerConnector()
            self.worker = NoopWorkerConnector(self.vllm_config, KVConnectorRole.WORKER, self.kv_cache_config)
            self.kv_caches = {}
        else:
            self.scheduler_connector = CSharpSidecarConnector(self.vllm_config, KVConnectorRole.SCHEDULER,
                                                              self.kv_cache_config)
            self.worker = CSharpSidecarConnector(self.vllm_config, KVConnectorRole.WORKER, self.kv_cache_config)
            self.kv_caches = make_kv_caches("blocks_first", g)
            self.worker.register_kv_caches(self.kv_caches)
        self.timed = Timed(self.scheduler_connector)
        self.sched = FakeScheduler(self.timed, BLOCK, num_blocks, max_num_batched_tokens, max_num_seqs)
        self._ctx = ForwardContext(attn_metadata={})

    # ------------------------------------------------------------------ pieces of a step

    def add(self, request: Request) -> None:
        self.sched.add_request(request)

    def schedule(self):
        return self.sched.schedule()

    def run_worker(self, so, worker=None) -> Tuple[set, set, set, float]:
        """vLLM's worker-side connector calls for one step (Model Runner V1 order, no per-layer work):
        bind, start_load_kv, wait_for_save (when there is a forward), get_finished, load errors, clear. Returns
        finished_sending, finished_recving, invalid block ids, and the seconds spent in these calls."""
        c = worker or self.worker
        perf = time.perf_counter
        t0 = perf()
        c.bind_connector_metadata(so.kv_connector_metadata)
        c.start_load_kv(self._ctx)
        if so.total_num_scheduled_tokens > 0:
            c.wait_for_save()
        sending, recving = c.get_finished(so.finished_req_ids)
        invalid = c.get_block_ids_with_load_errors()
        c.clear_connector_metadata()
        dt = perf() - t0
        return sending or set(), recving or set(), invalid or set(), dt

    def update(self, so, sending: set, recving: set, invalid: set) -> None:
        out = KVConnectorOutput(finished_sending=sending or None, finished_recving=recving or None,
                                invalid_block_ids=set(invalid), expected_finished_count=1)
        self.sched.update_from_output(so, out, sample_token)

    def step(self):
        """One whole engine step: schedule, the worker's calls, update_from_output."""
        so = self.schedule()
        sending, recving, invalid, _ = self.run_worker(so)
        self.update(so, sending, recving, invalid)
        return so

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            self.step()
        raise TimeoutError("the fake engine did not finish its requests")

    # ------------------------------------------------------------------ state

    def scheduler_stats(self) -> dict:
        return self.scheduler_connector.stats() if not self.noop else {}

    def worker_stats(self) -> dict:
        return self.worker.stats() if not self.noop else {}

    def close(self) -> None:
        for c in (self.scheduler_connector, self.worker):
            try:
                c.shutdown()
            except Exception:  # noqa: BLE001
                pass


def delta(after: dict, before: dict, keys) -> dict:
    return {k: round(after.get(k, 0) - before.get(k, 0), 6) for k in keys}
