#!/usr/bin/env python3
"""Scheduler-side connector overhead per engine step with 64 running requests and no transfers
(decode steps): the Python time spent inside the connector's calls per step, next to a full scheduler
step with a no-op connector measured in the same run (the baseline).

    /usr/bin/python3 integration/bench_connector_overhead.py [--json]
"""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fake_engine.engine import ensure_import_paths  # noqa: E402


def main() -> int:
    ensure_import_paths()
    import tempfile

    from vllm.config import CacheConfig, VllmConfig
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from csharp_kv.vllm.connector import CSharpSidecarConnector
    from csharp_kv.vllm.metadata import CSharpSidecarMetadata
    from fake_engine.engine import sample_token
    from fake_engine.scheduler import FakeScheduler

    class NoopConnector:
        def on_new_request(self, r): pass
        def get_num_new_matched_tokens(self, r, n): return 0, False
        def update_state_after_alloc(self, r, b, n): pass
        def build_connector_meta(self, so): return CSharpSidecarMetadata()
        def request_finished(self, r, b): return False, None
        def update_connector_output(self, o): pass
        def take_events(self): return ()

    class Timed:
        """Accumulates the time spent inside every connector call the scheduler makes."""

        def __init__(self, inner):
            self.inner = inner
            self.seconds = 0.0

        def __getattr__(self, name):
            target = getattr(self.inner, name)
            if not callable(target):
                return target

            def call(*a, **k):
                t0 = time.perf_counter()
                try:
                    return target(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t0
            return call

    d = tempfile.mkdtemp()
    kvt = KVTransferConfig(kv_connector="csharp-sidecar", kv_role="kv_both",
                           kv_connector_extra_config={"socket_path": os.path.join(d, "absent.sock"), "chunk_tokens": 256})
    results = {}
    for name in ("noop", "csharp-sidecar"):
        connector = NoopConnector() if name == "noop" else CSharpSidecarConnector(
            VllmConfig(cache_config=CacheConfig(block_size=16), kv_transfer_config=kvt), KVConnectorRole.SCHEDULER, None)
        timed = Timed(connector)
        sched = FakeScheduler(timed, 16, 64 * 40, max_num_batched_tokens=64 * 600, max_num_seqs=64)
        for i in range(64):
            sched.add_request(Request(f"r{i}", [(i * 31 + j) % 30000 for j in range(500)], max_tokens=10_000))
        so = sched.schedule()
        sched.update_from_output(so, KVConnectorOutput(), sample_token)
        meta_s = step_s = 0.0
        steps = 300
        timed.seconds = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            so = sched.schedule()
            t1 = time.perf_counter()
            sched.update_from_output(so, KVConnectorOutput(), sample_token)
            step_s += time.perf_counter() - t0
            t2 = time.perf_counter()
            connector.build_connector_meta(so)
            meta_s += time.perf_counter() - t2
            del t1
        results[name] = {"step_us": step_s / steps * 1e6, "connector_calls_us": timed.seconds / steps * 1e6,
                         "build_connector_meta_us": meta_s / steps * 1e6}
        if name != "noop":
            connector.shutdown()
    results["connector_overhead_per_step_us"] = results["csharp-sidecar"]["step_us"] - results["noop"]["step_us"]
    if "--json" in sys.argv:
        print(json.dumps(results, indent=1))
    else:
        print(f"64 running requests, decode steps, no transfers ({steps} steps):")
        print(f"  scheduler step with no-op connector      {results['noop']['step_us']:8.1f} us")
        print(f"  scheduler step with csharp-sidecar        {results['csharp-sidecar']['step_us']:8.1f} us")
        print(f"  time inside connector calls per step      {results['csharp-sidecar']['connector_calls_us']:8.1f} us (target < 200)")
        print(f"  step difference (noisy)                   {results['connector_overhead_per_step_us']:8.1f} us")
        print(f"  build_connector_meta alone                {results['csharp-sidecar']['build_connector_meta_us']:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
