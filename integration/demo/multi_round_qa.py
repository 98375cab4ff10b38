#!/usr/bin/env python3
"""The main job: a multi-round QA workload (a shared system prompt, several users, several rounds; each
round's prompt is the previous prompt + the answer + a new question) through the vLLM-faithful fake
engine and the real shim, against a real sidecar. Prints, per round, the prefill tokens loaded from the
sidecar against the ideal (every shared full chunk) and, at the end, what the sidecar stored and moved.

The engine's own prefix cache is off, as after the GPU cache has long evicted these conversations (or
on a restarted engine): every reused token must come from the sidecar."""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fake_engine.engine import EngineOptions, FakeEngine, SidecarProcess, ensure_import_paths  # noqa: E402


def tokens(n: int, seed: int) -> list:
    return [(seed * 7919 + i * 104729) % 30000 + 1000 for i in range(n)]


class IdealCache:
    """What a perfect chunk cache holds: every full chunk of every computed sequence so far."""

    def __init__(self, chunk: int, block: int):
        self.chunk, self.block = chunk, block
        self.prefixes = set()

    def add(self, seq: list) -> None:
        for k in range(1, len(seq) // self.chunk + 1):
            self.prefixes.add(tuple(seq[:k * self.chunk]))

    def hit(self, prompt: list) -> int:
        k = 0
        while (k + 1) * self.chunk <= len(prompt) and tuple(prompt[:(k + 1) * self.chunk]) in self.prefixes:
            k += 1
        return min(k * self.chunk, ((len(prompt) - 1) // self.block) * self.block)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sidecar-bin", help="kvsidecar.dll to start (default: $KVSIDECAR_BIN or out/sidecar)")
    ap.add_argument("--socket", help="use a sidecar already listening on this socket")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=2048)
    ap.add_argument("--question-tokens", type=int, default=96)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--compare-tiers", action="store_true",
                    help="run the workload three times with an L1 too small for it: L1 alone, L1 + a local disk tier, "
                         "and L1 + a Redis tier on a fresh redis-server (when installed); print the hit rates")
    ap.add_argument("--l1-bytes", type=int, default=1 << 30, help="the sidecar's L1 capacity")
    args = ap.parse_args(argv)
    if args.sidecar_bin:
        os.environ["KVSIDECAR_BIN"] = args.sidecar_bin
    ensure_import_paths()
    if args.compare_tiers:
        return compare_tiers(args)
    return run_demo(args)


def run_demo(args, sidecar_args=(), label=None, quiet=False) -> int:
    """Runs the workload once against a sidecar started with ``sidecar_args`` (or the one on ``--socket``)."""
    from vllm.v1.request import Request

    sidecar = None if args.socket else SidecarProcess(capacity_bytes=args.l1_bytes, extra_args=list(sidecar_args),
                                                      extent_bytes=max(1 << 20, min(args.l1_bytes // 4, 64 << 20)))
    socket_path = args.socket or sidecar.socket_path
    longest = args.system_tokens + args.rounds * (args.question_tokens + args.answer_tokens)
    opts = EngineOptions(era="blocks_first", tp=args.tp, num_blocks=args.users * (longest // 16 + 8),
                         num_layers=8, num_heads=4, head_size=32, chunk_tokens=args.chunk_tokens,
                         max_num_batched_tokens=4096)
    engine = FakeEngine(socket_path, opts)
    ideal = IdealCache(args.chunk_tokens, opts.block_size)
    system = tokens(args.system_tokens, 1)
    history = {u: list(system) for u in range(args.users)}
    print(f"kvsidecar demo{' (' + label + ')' if label else ''}: {args.users} users x {args.rounds} rounds, system "
          f"prompt {args.system_tokens} tokens, {args.chunk_tokens}-token chunks, TP={args.tp}, L1 {args.l1_bytes >> 20} "
          f"MiB, socket {socket_path}")
    print(f"{'round':>5} {'prompt tok':>10} {'from sidecar':>12} {'recomputed':>10} {'hit rate':>8} {'ideal':>8}")
    ok = True
    started = time.monotonic()
    total_prompt = total_hit = 0
    try:
        for r in range(args.rounds):
            reqs = []
            for u in range(args.users):
                prompt = history[u] + tokens(args.question_tokens, 1000 * (u + 1) + r)
                reqs.append((u, Request(f"u{u}-r{r}", prompt, max_tokens=args.answer_tokens)))
            expected = sum(ideal.hit(req.prompt_token_ids) for _, req in reqs) if r > 0 else None
            # Round 0: users arrive one after another, so later users can reuse the system prompt.
            if r == 0:
                expected = 0
                for _, req in reqs:
                    expected += ideal.hit(req.prompt_token_ids)
                    engine.add(req)
                    engine.run()
                    ideal.add(req.all_token_ids[:-1])
            else:
                for _, req in reqs:
                    engine.add(req)
                engine.run()
                for _, req in reqs:
                    ideal.add(req.all_token_ids[:-1])
            prompt_tokens = sum(req.num_prompt_tokens for _, req in reqs)
            hit = sum(req.num_external_computed_tokens for _, req in reqs)
            for u, req in reqs:
                history[u] = list(req.all_token_ids)
            total_prompt += prompt_tokens
            total_hit += hit
            print(f"{r + 1:>5} {prompt_tokens:>10} {hit:>12} {prompt_tokens - hit:>10} {hit / prompt_tokens:>8.1%} "
                  f"{expected / prompt_tokens:>8.1%}")
            ok &= hit >= expected
        elapsed = time.monotonic() - started
        from csharp_kv import protocol as p
        from csharp_kv.client import SidecarClient

        stats_client = SidecarClient(socket_path, "demo", "client")
        stats_client.ensure_connected(wait=5.0)  # connecting runs in the background; a tool may wait for it
        stats = stats_client.call(p.Opcode.STATS)
        stats_client.close()
        s = dict(zip(p.STATS_FIELDS, stats.fields)) if stats.ok else {}
        w = engine.worker_stats()
        load_s = sum(x["load_wait_seconds"] for x in w)
        store_s = sum(x["store_submit_seconds"] for x in w)
        mib = 1 << 20
        print(f"prefill tokens saved: {total_hit} of {total_prompt} ({total_hit / total_prompt:.1%}) in {elapsed:.1f} s, "
              f"{engine.steps} engine steps")
        if s:
            print(f"sidecar: {s['chunks']} chunks ({s['used_bytes'] / mib:.1f} MiB) held, stored {s['stored_bytes'] / mib:.1f} MiB, "
                  f"loaded {s['loaded_bytes'] / mib:.1f} MiB, hits {s['hits']} misses {s['misses']} evictions {s['evictions']}")
            if load_s > 0:
                print(f"sidecar throughput seen by the engine: load {s['loaded_bytes'] / mib / load_s:.0f} MiB/s "
                      f"(round trips included); stores are asynchronous: {store_s * 1000:.1f} ms of engine time "
                      f"to submit them")
        if engine.mismatches:
            print("KV MISMATCHES:", engine.mismatches[:5])
            ok = False
        for t in (s.get("tiers") or []) if s else []:
            t = dict(zip(p.TIER_STATS_FIELDS, t))
            print(f"tier {t['name']} ({t['policy']}): {t['chunks']} chunks ({t['used_bytes'] / mib:.1f} MiB), "
                  f"written {t['writes']} (dropped {t['drops']}, not admitted {t['not_admitted']}), promoted into L1 "
                  f"{t['promotions']}, corrupt {t['corrupt']}, errors {t['errors']}")
        if not quiet:
            print("hit rate equals the ideal in every round" if ok else "HIT RATE BELOW THE IDEAL")
        args.last_result = (total_hit, total_prompt)
    finally:
        engine.close()
        if sidecar is not None:
            sidecar.stop()
    return 0 if ok else 1


def compare_tiers(args) -> int:
    """The same workload with an L1 that holds one conversation but not all: alone, over a disk tier, over a Redis tier."""
    import shutil
    import socket as so
    import subprocess
    import tempfile

    # 64-token chunks of 256 KiB: a 12 MiB L1 holds about half of the conversations' distinct chunks.
    args.l1_bytes = 12 << 20
    args.chunk_tokens = 64
    args.socket = None
    rows = []
    disk = tempfile.mkdtemp(prefix="kvsc-demo-disk-")
    redis = None
    try:
        configs = [("L1 only", []),
                   ("L1 + disk", [f"--Sidecar:Disk:Path={disk}", "--Sidecar:Disk:AdmitAfterSightings=1"])]
        if shutil.which("redis-server"):
            with so.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            configs.append(("L1 + Redis", [f"--Sidecar:Redis:Configuration=127.0.0.1:{port}"]))
        for label, extra in configs:
            run_demo(args, extra, label, quiet=True)
            rows.append((label,) + args.last_result)
            print()
    finally:
        if redis is not None:
            redis.kill()
            redis.wait()
        shutil.rmtree(disk, ignore_errors=True)
    print(f"{'configuration':<14} {'prefill tokens saved':>22} {'of':>8} {'hit rate':>9}")
    for label, hit, total in rows:
        print(f"{label:<14} {hit:>22} {total:>8} {hit / total:>9.1%}")
    base = rows[0][1]
    better = all(hit > base for _, hit, _ in rows[1:])
    print("the tiers below L1 keep hits that L1 alone loses" if better else "NO TIER KEPT MORE THAN L1 ALONE")
    return 0 if better else 1


if __name__ == "__main__":
    sys.exit(main())
