#!/usr/bin/env python3
"""GPU checks of kvsidecar's CUDA data plane, in one run, for a lent GPU machine (integration/gpu/README.md).

It starts a sidecar (``--sidecar``: the self-contained ``kvsidecar`` executable of the GPU bundle, its directory, or a
``kvsidecar.dll`` run with ``dotnet``) on a private socket, then SEPARATE engine processes (this script re-run with
``--engine``) that allocate a vLLM-shaped KV cache of Llama-3-8B (32 layers, each a ``(2, num_blocks, 16, 8, 128)``
bfloat16 tensor) and drive the REAL shim's ``WorkerSide`` (register_kv_caches, wait_for_save with StoreOps,
start_load_kv with LoadOps, get_finished) with 256-token chunks (16 blocks of 16 tokens per chunk). It checks:

* bytes: chunks stored from random KV are loaded into OTHER blocks and compared byte for byte (``torch.equal`` on
  the GPU, per layer, on an int16 view: bfloat16 NaNs would compare unequal);
* figures: registration time of the 32 layers; store and load bandwidth (first submit to all replies); one-chunk
  load latency, submit to reply (p50, p99); the sidecar's IPC opens during the hot loop (from STATS, where it says
  them); all next to torch's own pinned copy of the same bytes (``host.copy_(gpu, non_blocking=True)``);
* cases: (a) an engine on ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` is refused by the shim with the
  message naming the option and keeps running uncached; (b) a chunk stored by one engine process is loaded by
  another; (c) an engine SIGKILLed while registered (with loads in flight) does not stop the sidecar serving others.

``--backend double`` runs the same on the CUDA driver double (tests/cuda_double: device memory is host memory) so
that CI without a GPU runs every line of this script; its figures mean nothing. Exit code 0 iff every byte check and
case passed; performance targets are printed (met yes/no) and never change the exit code. 2: bad setup (a missing
Python module, no sidecar)."""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHIM = os.path.join(REPO, "python_shim")
FAKES = os.path.join(SHIM, "tests", "fakes")  # the vLLM import surface the shim needs (WorkerSide uses none of vLLM)
DOUBLE_BUILD = os.path.join(REPO, "tests", "cuda_double", "build.sh")
DOUBLE_UUID = "GPU-facecda0-0000-0000-0000-000000000000"  # the double's device 0

MODEL_ID = "meta-llama/Meta-Llama-3-8B"
LAYERS, BLOCK_TOKENS, KV_HEADS, HEAD_SIZE = 32, 16, 8, 128
CHUNK_TOKENS = 256
BPC = CHUNK_TOKENS // BLOCK_TOKENS                       # 16 blocks per chunk
BLOCK_BYTES = 2 * BLOCK_TOKENS * KV_HEADS * HEAD_SIZE * 2  # K and V of one block of one layer, bf16: 64 KiB
CHUNK_BYTES = BPC * BLOCK_BYTES * LAYERS                 # 32 MiB: 256 tokens x 128 KiB
KEY_ENV = "KVSC_GPU_CHECK_KEY"

# Targets (README.md): store and load at least 80 % of torch's pinned copy, registration under 1 s, a one-chunk
# load under 1 ms (p50).
TARGET_BW_RATIO = 0.80
TARGET_REGISTER_S = 1.0
TARGET_LATENCY_S = 1e-3


def sizes(quick: bool) -> dict:
    """Chunks per store round (N), requests per round, rounds (the first is "cold"), loads per round, one-chunk
    latency samples, baseline repetitions, and the L1 capacity in chunks (N and a few: later rounds evict)."""
    if quick:
        return {"chunks": 4, "requests": 2, "rounds": 3, "load_reps": 2, "latency_loads": 20, "baseline_reps": 3,
                "capacity_chunks": 8}
    return {"chunks": 64, "requests": 8, "rounds": 4, "load_reps": 2, "latency_loads": 50, "baseline_reps": 5,
            "capacity_chunks": 72}


def tokens_for(seed: int, num_chunks: int) -> bytes:
    """u32le token ids of a request: deterministic from ``seed``, the same in every process."""
    rng = random.Random(seed)
    return array("I", [rng.getrandbits(31) for _ in range(num_chunks * CHUNK_TOKENS)]).tobytes()


def block_ids(first_block: int, num_chunks: int) -> bytes:
    return array("i", range(first_block, first_block + num_chunks * BPC)).tobytes()


# =============================================================================================== engine process

class Engine:
    """One engine process: its KV cache (torch on cuda:0, or tensors over the double's device memory) and the shim's
    WorkerSide. Each public ``cmd_*`` is one RPC from the parent."""

    def __init__(self):
        import torch  # noqa: PLC0415 - only engine processes need torch at once

        self.torch = torch
        self.ws = None
        self.kv = {}
        self.kv16 = {}
        self.backend = None
        self.dev = None
        self.cu = None
        self.allocations = []
        self.keep = []
        self.warnings = []

    # -------------------------------------------------------------- set-up

    def cmd_init(self, backend, socket_path, instance_id, num_blocks, vmm=False, double_lib=None,
                 transfer_timeout_ms=30000.0):
        import logging  # noqa: PLC0415

        torch = self.torch
        self.backend = backend
        shape = (2, num_blocks, BLOCK_TOKENS, KV_HEADS, HEAD_SIZE)
        nbytes = num_blocks * BLOCK_BYTES  # one layer
        names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
        info = {"pid": os.getpid(), "torch": torch.__version__, "python": platform.python_version()}
        t0 = time.perf_counter()
        if backend == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False: no usable GPU for --backend cuda")
            torch.cuda.set_device(0)
            self.dev = torch.device("cuda:0")
            for name in names:
                self.kv[name] = torch.zeros(shape, dtype=torch.bfloat16, device=self.dev)
            torch.cuda.synchronize()
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=torch.cuda.get_device_name(0), cuda_runtime=torch.version.cuda,
                        gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", device_uuid=str(getattr(props, "uuid", "?")),
                        cuda_driver=self._driver_version(ctypes.CDLL("libcuda.so.1")),
                        allocator=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
        else:
            self.dev = torch.device("cpu")
            cu = self.cu = ctypes.CDLL(double_lib)
            u64 = ctypes.c_uint64
            cu.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), ctypes.c_size_t]
            cu.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
            cu.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
            cu.fakecuda_mark_vmm.argtypes = [u64]
            check_cu(cu.cuInit(0), "cuInit")
            ctx = ctypes.c_void_p()
            check_cu(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0), "cuDevicePrimaryCtxRetain")
            check_cu(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            for name in names:
                d = u64()
                check_cu(cu.cuMemAlloc_v2(ctypes.byref(d), nbytes), "cuMemAlloc_v2")
                self.allocations.append(d.value)
                buf = (ctypes.c_uint8 * nbytes).from_address(d.value)
                self.keep.append(buf)
                self.kv[name] = torch.frombuffer(buf, dtype=torch.uint8).view(torch.bfloat16).view(shape)
                if vmm:
                    # What expandable segments do to the real allocation: not legacy-IPC capable.
                    check_cu(cu.fakecuda_mark_vmm(d.value), "fakecuda_mark_vmm")
            info.update(gpu="kvsidecar CUDA driver double (no GPU)", cuda_runtime="-", device_uuid=DOUBLE_UUID,
                        cuda_driver=self._driver_version(cu))
        self.kv16 = {name: t.view(torch.int16) for name, t in self.kv.items()}
        info["alloc_seconds"] = time.perf_counter() - t0
        info["kv_bytes"] = nbytes * LAYERS

        # The shim, as vLLM's worker-role connector holds it.
        sys.path[:0] = [p for p in (SHIM, FAKES) if p not in sys.path]
        from csharp_kv.config import ShimConfig  # noqa: PLC0415
        from csharp_kv.memory import KvSpec  # noqa: PLC0415
        from csharp_kv.vllm.worker import WorkerSide  # noqa: PLC0415

        engine = self

        class Capture(logging.Handler):
            def emit(self, record):
                engine.warnings.append(record.getMessage())

        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        capture = Capture(level=logging.WARNING)
        logging.getLogger("csharp_kv").addHandler(capture)
        cfg = ShimConfig(socket_path=socket_path, chunk_tokens=CHUNK_TOKENS, transfer_timeout_ms=transfer_timeout_ms,
                         connect_timeout_ms=5000.0, send_timeout_ms=1000.0)
        self.ws = WorkerSide(cfg, instance_id, 0, 1, MODEL_ID, KvSpec(BLOCK_TOKENS, KV_HEADS, HEAD_SIZE))
        return info

    @staticmethod
    def _driver_version(lib) -> str:
        v = ctypes.c_int()
        try:
            if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
                return f"{v.value // 1000}.{v.value % 1000 // 10}"
        except AttributeError:
            pass
        return "?"

    def cmd_register(self, timeout=20.0):
        """Time of register_kv_caches until the sidecar accepted the 32 layers (or the shim refused them)."""
        ws = self.ws
        before = len(self.warnings)
        t0 = time.perf_counter()
        ws.register_kv_caches(self.kv)
        while not ws.registered and ws.disabled_reason is None and time.perf_counter() - t0 < timeout:
            if any("refused" in w for w in self.warnings[before:]):
                break
            time.sleep(0.0002)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "registered": ws.registered, "disabled_reason": ws.disabled_reason,
                "warnings": self.warnings[before:]}

    # -------------------------------------------------------------- data

    def _expected(self, seed: int, layer: int, count: int):
        torch = self.torch
        g = torch.Generator(device=self.dev)
        g.manual_seed(seed * 1_000_003 + layer)
        return torch.randint(-32768, 32768, (2, count, BLOCK_TOKENS, KV_HEADS, HEAD_SIZE), dtype=torch.int16,
                             device=self.dev, generator=g)

    def _sync(self):
        if self.backend == "cuda":
            self.torch.cuda.synchronize()

    def cmd_fill(self, seed, start, count, sync=True):
        """Random KV (deterministic from ``seed``) in blocks [start, start+count): the "forward pass". Without
        ``sync`` the kernels may still run when the stores are submitted: the store event must order them."""
        t0 = time.perf_counter()
        for layer, t in enumerate(self.kv16.values()):
            t[:, start:start + count].copy_(self._expected(seed, layer, count))
        if sync:
            self._sync()
        return time.perf_counter() - t0

    def cmd_poison(self, start, count, value=-1):
        for t in self.kv16.values():
            t[:, start:start + count].fill_(value)
        self._sync()

    def cmd_verify(self, pairs):
        """Byte equality of blocks [dst, dst+count) and [src, src+count) in every layer: ``pairs`` of
        (dst, src, count). Returns the number of bytes compared and the layers that differ."""
        bad = []
        compared = 0
        for layer, (name, t) in enumerate(self.kv16.items()):
            for dst, src, count in pairs:
                if not self.torch.equal(t[:, dst:dst + count], t[:, src:src + count]):
                    bad.append((layer, dst, src, count))
                compared += count * BLOCK_BYTES
        return {"ok": not bad and compared > 0, "bytes": compared, "bad": bad[:10]}

    def cmd_verify_expected(self, seed, start, count):
        """Blocks [start, start+count) against the bytes ``fill(seed, ..., count)`` wrote (in any process)."""
        bad = []
        for layer, t in enumerate(self.kv16.values()):
            if not self.torch.equal(t[:, start:start + count], self._expected(seed, layer, count)):
                bad.append(layer)
        return {"ok": not bad, "bytes": count * BLOCK_BYTES * LAYERS, "bad_layers": bad[:10]}

    # -------------------------------------------------------------- transfers through the shim

    def _meta(self, loads=(), stores=()):
        from csharp_kv.vllm.metadata import CSharpSidecarMetadata  # noqa: PLC0415

        return CSharpSidecarMetadata(loads=list(loads), stores=list(stores))

    def cmd_store(self, reqs, timeout=120.0):
        """One step's stores (wait_for_save), then waits until every store is answered: the time from the first
        submit to the last reply, and what the shim counted (stored chunks, errors)."""
        from csharp_kv.vllm.metadata import StoreOp  # noqa: PLC0415

        ws = self.ws
        ops = [StoreOp(r["req_id"], None, tokens_for(r["tokens_seed"], r["num_chunks"]), 0, r["num_chunks"],
                       block_ids(r["first_block"], r["num_chunks"]), 0) for r in reqs]
        meta = self._meta(stores=ops)
        stored0, errors0 = ws.stats["stored_chunks"], ws.stats["store_errors"]
        ids = {r["req_id"] for r in reqs}
        t0 = time.perf_counter()
        ws.wait_for_save(meta)
        submitted = time.perf_counter() - t0
        futures = [f for rid in ids for f, _ in getattr(ws, "_stores", {}).get(rid, _NoStores).futures]
        if futures:
            import concurrent.futures as cf  # noqa: PLC0415

            cf.wait(futures, timeout=timeout)
        answered = time.perf_counter() - t0 if futures else None
        # get_finished: the engine learns that the requests' stores are done (and may free their blocks).
        done = set()
        sending, _ = ws.get_finished(ids)
        done |= set(sending or ())
        deadline = time.monotonic() + timeout
        while done != ids and time.monotonic() < deadline:
            time.sleep(0.0002)
            sending, _ = ws.get_finished(set())
            done |= set(sending or ())
        if answered is None:
            answered = time.perf_counter() - t0
        return {"seconds": answered, "submit_seconds": submitted, "finished": sorted(done),
                "stored_chunks": ws.stats["stored_chunks"] - stored0, "store_errors": ws.stats["store_errors"] - errors0}

    def cmd_load(self, reqs, is_async=False, timeout=120.0):
        """One step's loads (start_load_kv): synchronous ones return when every reply arrived; asynchronous ones are
        collected with get_finished. Returns the time, the chunks loaded and the blocks reported failed."""
        from csharp_kv.vllm.metadata import LoadOp  # noqa: PLC0415

        ws = self.ws
        ops = [LoadOp(r["req_id"], None, tokens_for(r["tokens_seed"], r.get("first_chunk", 0) + r["num_chunks"]),
                      r.get("first_chunk", 0), r["num_chunks"], block_ids(r["first_block"], r["num_chunks"]), 0,
                      is_async) for r in reqs]
        loaded0, errors0 = ws.stats["loaded_chunks"], ws.stats["load_errors"]
        ids = {r["req_id"] for r in reqs}
        t0 = time.perf_counter()
        ws.start_load_kv(self._meta(loads=ops))
        if is_async:
            done = set()
            deadline = time.monotonic() + timeout
            while done != ids and time.monotonic() < deadline:
                _, recving = ws.get_finished(set())
                done |= set(recving or ())
                if done != ids:
                    time.sleep(0.0002)
        seconds = time.perf_counter() - t0
        failed = ws.get_block_ids_with_load_errors()
        return {"seconds": seconds, "loaded_chunks": ws.stats["loaded_chunks"] - loaded0,
                "load_errors": ws.stats["load_errors"] - errors0, "failed_blocks": len(failed or ())}

    def cmd_load_nowait(self, reqs):
        """Submits asynchronous loads and returns at once (the parent kills this process next)."""
        from csharp_kv.vllm.metadata import LoadOp  # noqa: PLC0415

        ops = [LoadOp(r["req_id"], None, tokens_for(r["tokens_seed"], r["num_chunks"]), 0, r["num_chunks"],
                      block_ids(r["first_block"], r["num_chunks"]), 0, True) for r in reqs]
        self.ws.start_load_kv(self._meta(loads=ops))
        return len(ops)

    def cmd_latency(self, req, n):
        """``n`` one-chunk synchronous loads, each timed from submit to reply (what the engine waits)."""
        from csharp_kv.vllm.metadata import LoadOp  # noqa: PLC0415

        op = LoadOp(req["req_id"], None, tokens_for(req["tokens_seed"], 1), 0, 1, block_ids(req["first_block"], 1), 0,
                    False)
        meta = self._meta(loads=[op])
        loaded0 = self.ws.stats["loaded_chunks"]
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.ws.start_load_kv(meta)
            samples.append(time.perf_counter() - t0)
        failed = self.ws.get_block_ids_with_load_errors()
        return {"samples": samples, "loaded_chunks": self.ws.stats["loaded_chunks"] - loaded0,
                "failed_blocks": len(failed or ())}

    def cmd_stats(self):
        """The sidecar's STATS by name (names the shim's protocol knows; later fields as field_N)."""
        from csharp_kv import protocol as p  # noqa: PLC0415

        reply = self.ws.client.call(p.Opcode.STATS, None, timeout=10.0)
        if not reply.ok:
            return {"error": f"{reply.error} (code {reply.error_code})"}
        out = {}
        for i, value in enumerate(reply.fields):
            if isinstance(value, dict):
                out.update({str(k): v for k, v in value.items()})
            else:
                out[p.STATS_FIELDS[i] if i < len(p.STATS_FIELDS) else f"field_{i}"] = value
        return out

    def cmd_shim_stats(self):
        return dict(self.ws.stats)

    def cmd_baseline(self, nbytes, chunk_bytes, reps):
        """torch's own copy of the same bytes: pinned host <-> GPU with non_blocking copies and a synchronize, best of
        ``reps``; with the double, a host memcpy. Also one chunk's bytes host-to-device (the latency's floor)."""
        torch = self.torch
        pinned = self.backend == "cuda"
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.dev)
        src.fill_(7)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

        def best(fn, n):
            times = []
            for _ in range(n):
                self._sync()
                t0 = time.perf_counter()
                fn()
                self._sync()
                times.append(time.perf_counter() - t0)
            return min(times)

        d2h = best(lambda: host.copy_(src, non_blocking=pinned), reps)
        h2d = best(lambda: src.copy_(host, non_blocking=pinned), reps)
        one = best(lambda: src[:chunk_bytes].copy_(host[:chunk_bytes], non_blocking=pinned), max(reps, 10))
        del src, host
        return {"kind": "torch pinned copy" if pinned else "host memcpy (double: no GPU)", "bytes": nbytes,
                "d2h_Bps": nbytes / d2h, "h2d_Bps": nbytes / h2d, "chunk_h2d_seconds": one}

    def cmd_alive(self):
        return {"registered": bool(self.ws and self.ws.registered), "warnings": list(self.warnings)}

    def cmd_shutdown(self):
        if self.ws is not None:
            self.ws.shutdown()
        return True


class _NoStores:
    futures = ()


def check_cu(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed (CUresult {rc})")


def engine_main(rpc_path: str) -> int:
    from multiprocessing.connection import Client  # noqa: PLC0415

    key = bytes.fromhex(os.environ.pop(KEY_ENV))
    engine = Engine()  # imports torch before connecting: the parent starts several engines at once
    conn = Client(rpc_path, family="AF_UNIX", authkey=key)
    while True:
        try:
            cmd, kwargs = conn.recv()
        except (EOFError, OSError):
            break
        try:
            conn.send(("ok", getattr(engine, "cmd_" + cmd)(**kwargs)))
        except Exception:  # noqa: BLE001 - reported to the parent
            conn.send(("error", traceback.format_exc()))
        if cmd == "shutdown":
            break
    conn.close()
    return 0


# =============================================================================================== parent process

class SetupError(Exception):
    """Bad setup: exit code 2."""


def check_imports(backend: str) -> None:
    """Fails early, with what to do, when a module the engines need is missing (the GPU machine may lack msgpack)."""
    missing = []
    for module in ("torch", "msgpack"):
        try:
            __import__(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        raise SetupError(
            "missing Python module(s): " + ", ".join(missing) + f" for {sys.executable}.\n"
            "The shim (python_shim/csharp_kv/protocol.py) needs msgpack and the engines need torch. Install them "
            "(pip install msgpack), or on a machine without network carry a wheel and install it from the file: "
            "see integration/gpu/README.md, 'msgpack'.")
    import torch  # noqa: PLC0415

    if backend == "cuda" and not torch.version.cuda:
        raise SetupError(f"torch {torch.__version__} has no CUDA (torch.version.cuda is None): use a CUDA build of "
                         "torch, or --backend double")
    sys.path[:0] = [p for p in (SHIM, FAKES) if p not in sys.path]
    try:
        import csharp_kv.vllm.worker  # noqa: F401, PLC0415
    except ImportError as e:
        raise SetupError(f"the shim does not import from {SHIM}: {e}") from e


def sidecar_command(path: str) -> list:
    if os.path.isdir(path):
        for name in ("kvsidecar", "kvsidecar.dll"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
    if not os.path.isfile(path):
        raise SetupError(f"no sidecar at {path}: pass --sidecar with the bundle's kvsidecar (scripts/gpu_bundle.sh) "
                         "or out/sidecar/kvsidecar.dll (scripts/publish.sh)")
    if path.endswith(".dll"):
        if shutil.which("dotnet") is None:
            raise SetupError(f"{path} needs dotnet, which is not on PATH: use the self-contained bundle "
                             "(scripts/gpu_bundle.sh)")
        return ["dotnet", path]
    if not os.access(path, os.X_OK):
        raise SetupError(f"{path} is not executable (chmod +x it)")
    return [path]


def double_library(explicit: str) -> str:
    path = explicit or os.environ.get("KVSIDECAR_CUDA_LIBRARY")
    if path:
        if not os.path.isfile(path):
            raise SetupError(f"the CUDA driver double {path} does not exist")
        return os.path.abspath(path)
    try:
        out = subprocess.run(["bash", DOUBLE_BUILD], check=True, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        raise SetupError(f"cannot build the CUDA driver double with {DOUBLE_BUILD} (needs gcc): {e} {detail}") from e
    return out.stdout.strip().splitlines()[-1]


class Sidecar:
    def __init__(self, command, socket_path, capacity, extent, extra, env, log_path):
        self.args = [*command, "--socket", socket_path, "--capacity-bytes", str(capacity), "--extent-bytes",
                     str(extent), "--Sidecar:Gpu=required", *extra]
        self.lines = []
        self.ready = threading.Event()
        self.log_file = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", env=env)
        threading.Thread(target=self._read, daemon=True, name="sidecar-log").start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self.log_file.write(line)
            self.log_file.flush()
            if line.startswith("READY "):
                self.ready.set()

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)
                raise SetupError(f"the sidecar did not start ({' '.join(self.args)}; exit code {self.proc.poll()}):\n"
                                 + "".join(self.lines[-40:]))

    def alive(self):
        return self.proc.poll() is None

    def gpu_line(self):
        for line in self.lines:
            if "GPU data plane" in line:
                return line.split("GPU data plane:", 1)[-1].strip()
        return "?"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        time.sleep(0.1)
        self.log_file.close()


class EngineProcess:
    """This script with ``--engine``, in a process of its own; commands go over an authenticated Unix socket."""

    def __init__(self, name, tmp, env, prefix=()):
        from multiprocessing.connection import Listener  # noqa: PLC0415

        self.name = name
        self.rpc_path = os.path.join(tmp, f"{name}.rpc")
        key = secrets.token_bytes(16)
        self.listener = Listener(self.rpc_path, family="AF_UNIX", authkey=key)
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        env = dict(env, **{KEY_ENV: key.hex()})
        self.proc = subprocess.Popen([*prefix, sys.executable, os.path.abspath(__file__), "--engine", self.rpc_path],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.conn = None
        self._accepted = {}
        threading.Thread(target=self._accept, daemon=True, name=f"{name}-accept").start()

    def _accept(self):
        try:
            self._accepted["conn"] = self.listener.accept()
        except Exception as e:  # noqa: BLE001
            self._accepted["error"] = e

    @property
    def pid(self):
        return self.proc.pid

    def log_tail(self, n=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def _connected(self, timeout):
        deadline = time.monotonic() + timeout
        while self.conn is None:
            if "conn" in self._accepted:
                self.conn = self._accepted["conn"]
            elif "error" in self._accepted or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"engine {self.name} did not start (exit code {self.proc.poll()}):\n{self.log_tail()}")
            else:
                time.sleep(0.02)
        return self.conn

    def call(self, cmd, timeout=300.0, **kwargs):
        conn = self._connected(timeout)
        conn.send((cmd, kwargs))
        deadline = time.monotonic() + timeout
        while not conn.poll(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine {self.name} exited (code {self.proc.returncode}) during {cmd}:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine {self.name}: {cmd} took more than {timeout:.0f} s:\n{self.log_tail()}")
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"engine {self.name}: {cmd} failed:\n{value}")
        return value

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self, timeout=30.0):
        if self.proc.poll() is None:
            try:
                if self.conn is not None:
                    self.call("shutdown", timeout=timeout)
                self.proc.wait(timeout=timeout)
            except Exception:  # noqa: BLE001
                self.kill()
        if self.proc.poll() is None:
            self.kill()
        self.listener.close()
        self.log.close()


def engine_env(base: dict, backend: str, double_lib: str, vmm: bool = False) -> dict:
    env = dict(base)
    for name in ("KVSIDECAR_FAKE_CUDA_DEVICE", "KVSIDECAR_CUDA_LIBRARY", "PYTORCH_CUDA_ALLOC_CONF", KEY_ENV):
        env.pop(name, None)
    env["FAKE_VLLM_API"] = "v029"
    env["PYTHONUNBUFFERED"] = "1"
    if backend == "double":
        env["KVSIDECAR_CUDA_LIBRARY"] = double_lib
        env["KVSIDECAR_FAKE_CUDA_DEVICE"] = DOUBLE_UUID
    if vmm:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


def percentile(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def ipc_counter(stats: dict):
    for name, value in (stats or {}).items():
        low = name.lower()
        if "open" in low and ("ipc" in low or "handle" in low) and "close" not in low:
            return name, value
    return None, None


def run(args) -> dict:
    backend = args.backend
    sz = sizes(args.quick)
    n, nreq, rounds = sz["chunks"], sz["requests"], sz["rounds"]
    cpr = n // nreq  # chunks per request
    salt = random.getrandbits(40)  # token seeds unique to this run
    result = {"backend": backend, "quick": bool(args.quick), "sizes": sz, "chunk_bytes": CHUNK_BYTES,
              "machine": {}, "figures": [], "checks": {}, "errors": []}
    check_imports(backend)
    command = sidecar_command(args.sidecar)
    double_lib = double_library(args.double_lib) if backend == "double" else None
    tmp = tempfile.mkdtemp(prefix="kvsc-gpu-")
    result["work_dir"] = tmp
    extent = (128 if args.quick else 256) << 20
    capacity = sz["capacity_chunks"] * CHUNK_BYTES
    capacity = (capacity + extent - 1) // extent * extent
    side_env = dict(os.environ)
    extra = list(args.sidecar_arg or ())
    if backend == "double":
        extra.append(f"--Sidecar:CudaDriverLibrary={double_lib}")
    socket_path = os.path.join(tmp, "s.sock")
    sidecar = Sidecar(command, socket_path, capacity, extent, extra, side_env, os.path.join(tmp, "sidecar.log"))
    engines = {}
    base_env = dict(os.environ)
    try:
        sidecar.wait_ready(args.ready_timeout)
        result["machine"]["sidecar_gpu"] = sidecar.gpu_line()
        result["machine"]["sidecar"] = " ".join(command)
        # Every engine process starts now (torch imports overlap); each allocates when told.
        engines["A"] = EngineProcess("engine-a", tmp, engine_env(base_env, backend, double_lib))
        engines["B"] = EngineProcess("engine-b", tmp, engine_env(base_env, backend, double_lib))
        engines["K"] = EngineProcess("engine-k", tmp, engine_env(base_env, backend, double_lib))
        engines["V"] = EngineProcess("engine-v", tmp, engine_env(base_env, backend, double_lib, vmm=True))
        common = {"backend": backend, "socket_path": socket_path, "double_lib": double_lib}
        main_checks(engines["A"], common, sz, salt, cpr, result)
        case_vmm(engines["V"], common, salt, result, sidecar)
        case_two_engines(engines["A"], engines["B"], common, n, salt, result)
        blocks = sz["chunks"] * BPC
        case_killed_engine(engines["A"], engines["B"], engines["K"], common, salt, result, sidecar, a_dst=blocks)
        if args.sanitizer:
            case_sanitizer(tmp, base_env, backend, double_lib, common, salt, result)
        try:
            result["stats_end"] = engines["A"].call("stats", timeout=30)
        except Exception as e:  # noqa: BLE001
            result["errors"].append(f"final STATS: {e}")
        result["checks"]["sidecar_alive_at_end"] = {"ok": sidecar.alive()}
    except SetupError:
        raise
    except Exception:  # noqa: BLE001 - reported, and the run fails
        result["errors"].append(traceback.format_exc())
    finally:
        for e in engines.values():
            try:
                e.close(timeout=20)
            except Exception as ex:  # noqa: BLE001
                result["errors"].append(f"closing {e.name}: {ex}")
        sidecar.stop()
        result["sidecar_log_tail"] = "".join(sidecar.lines[-25:])
        if backend == "double":
            # A SIGKILLed exporter leaves its shm objects behind (the double unlinks them at a normal exit).
            for e in engines.values():
                for path in glob.glob(f"/dev/shm/fakecuda-{e.pid}-*") + glob.glob(f"/dev/shm/fakecuda-ev-{e.pid}-*"):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
        result["engine_pids"] = {e.name: e.pid for e in engines.values()}
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            for path in glob.glob(os.path.join(tmp, "*.log")) + glob.glob(os.path.join(tmp, "*.txt")):
                shutil.copy(path, args.log_dir)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result["machine"].update(host_info())
    required = ["bytes_verified", "vmm_refusal", "two_engines", "killed_engine", "sidecar_alive_at_end"]
    result["ok"] = not result["errors"] and all(result["checks"].get(k, {}).get("ok") for k in required)
    return result


def main_checks(a: EngineProcess, common: dict, sz: dict, salt: int, cpr: int, result: dict) -> None:
    """Engine A: registration, then rounds of fill -> store -> load into other blocks -> byte check, the one-chunk
    loads, STATS around that hot loop, and torch's copy of the same bytes. The L1 holds little more than one round,
    so round 0 finds it empty (its extents are allocated and pinned during the stores: reported apart, as "cold")
    and later rounds reuse evicted memory, as a sidecar in service does."""
    n, nreq, rounds = sz["chunks"], sz["requests"], sz["rounds"]
    blocks = n * BPC
    dst = blocks  # load target: the blocks after the source range
    info = a.call("init", instance_id="gpu-check-a", num_blocks=2 * blocks, **common)
    result["machine"].update({k: v for k, v in info.items() if k not in ("pid", "alloc_seconds")})
    reg = a.call("register")
    result["register"] = reg
    if not reg["registered"]:
        raise RuntimeError(f"engine A did not register: {reg}")
    stats0 = a.call("stats")
    result["stats_before"] = stats0

    def requests(r, first=0):
        return [{"req_id": f"r{r}-q{j}", "tokens_seed": salt * 1000 + r * 100 + j, "num_chunks": cpr,
                 "first_block": first + j * cpr * BPC} for j in range(nreq)]

    store_times, load_times, verified, failures = [], [], 0, []
    for r in range(rounds):
        # Round 0's KV is still being written (no synchronize) when its stores go out: the shim's store event must
        # hold the copies back (the byte check shows it). Later rounds are timed from a settled GPU.
        a.call("fill", seed=salt + r, start=0, count=blocks, sync=r > 0)
        out = a.call("store", reqs=requests(r))
        if out["stored_chunks"] != n or out["store_errors"]:
            failures.append(f"store round {r}: {out}")
        store_times.append(out["seconds"])
        for _ in range(sz["load_reps"]):
            # Into other blocks, poisoned first; every byte compared with its source blocks.
            a.call("poison", start=dst, count=blocks)
            out = a.call("load", reqs=requests(r, dst))
            if out["loaded_chunks"] != n or out["failed_blocks"]:
                failures.append(f"load round {r}: {out}")
            load_times.append(out["seconds"])
            check = a.call("verify", pairs=[(dst, 0, blocks)])
            verified += check["bytes"] if check["ok"] else 0
            if not check["ok"]:
                failures.append(f"load round {r}: wrong bytes in (layer, dst, src, blocks) {check['bad']}")
    # One-chunk loads, submit to reply: the last round's first chunk.
    first = requests(rounds - 1, dst)[0]
    a.call("poison", start=dst, count=BPC)
    lat = a.call("latency", req=first, n=sz["latency_loads"])
    check = a.call("verify", pairs=[(dst, 0, BPC)])
    verified += check["bytes"] if check["ok"] else 0
    if not check["ok"] or lat["loaded_chunks"] != sz["latency_loads"] or lat["failed_blocks"]:
        failures.append(f"one-chunk loads: loaded {lat['loaded_chunks']} of {sz['latency_loads']}, bytes ok "
                        f"{check['ok']}")
    stats1 = a.call("stats")
    result["stats_after_hot_loop"] = stats1
    base = a.call("baseline", nbytes=n * CHUNK_BYTES, chunk_bytes=CHUNK_BYTES, reps=sz["baseline_reps"])
    result["baseline"] = base
    result["shim_stats_a"] = a.call("shim_stats")

    nbytes = n * CHUNK_BYTES
    store_bw, load_bw = nbytes / min(store_times[1:]), nbytes / min(load_times)
    cold_bw = nbytes / store_times[0]
    p50, p99 = percentile(lat["samples"], 0.50), percentile(lat["samples"], 0.99)
    name, before = ipc_counter(stats0)
    _, after = ipc_counter(stats1)
    figures = result["figures"]
    figures.append(fig("registration (32 layers)", reg["seconds"], "s", None, f"< {TARGET_REGISTER_S:g} s",
                       reg["seconds"] < TARGET_REGISTER_S))
    figures.append(fig("store bandwidth", store_bw, "B/s", base["d2h_Bps"], f">= {TARGET_BW_RATIO:.0%} of baseline",
                       store_bw >= TARGET_BW_RATIO * base["d2h_Bps"], "device-to-host"))
    figures.append(fig("store bandwidth, cold L1 (round 0)", cold_bw, "B/s", base["d2h_Bps"], "(info)", None,
                       "includes allocating and pinning L1"))
    figures.append(fig("load bandwidth", load_bw, "B/s", base["h2d_Bps"], f">= {TARGET_BW_RATIO:.0%} of baseline",
                       load_bw >= TARGET_BW_RATIO * base["h2d_Bps"], "host-to-device"))
    figures.append(fig("one-chunk load p50", p50, "s", base["chunk_h2d_seconds"], "< 1 ms", p50 < TARGET_LATENCY_S,
                       "baseline: 32 MiB host-to-device"))
    figures.append(fig("one-chunk load p99", p99, "s", base["chunk_h2d_seconds"], "(info)", None))
    if name is None:
        figures.append(fig("IPC opens in hot loop", None, "", None, "0", None, note="STATS has no IPC counter"))
    else:
        grew = (after or 0) - (before or 0)
        figures.append(fig("IPC opens in hot loop", grew, "", None, "0", grew == 0,
                           note=f"STATS {name}: {before} -> {after}"))
    result["store_times"], result["load_times"], result["latency_samples"] = store_times, load_times, lat["samples"]
    expected = rounds * sz["load_reps"] * nbytes + CHUNK_BYTES
    result["checks"]["bytes_verified"] = {"ok": not failures and verified == expected, "bytes": verified,
                                          "failures": failures}


def fig(name, value, unit, baseline, target, met, note=""):
    """``ratio``: how close to the baseline, 1.0 = as fast as torch's own copy (bandwidth: value / baseline; time:
    baseline / value)."""
    ratio = None
    if value and baseline:
        ratio = baseline / value if unit == "s" else value / baseline
    return {"figure": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, "target": target,
            "met": met, "note": note}


def case_vmm(v: EngineProcess, common: dict, salt: int, result: dict, sidecar: Sidecar) -> None:
    """(a) expandable segments / VMM: the shim refuses the memory with the message naming the option, and the engine
    keeps running without the cache (stores and loads fail softly, every loaded block is reported for recompute)."""
    out = {"ok": False}
    result["checks"]["vmm_refusal"] = out
    try:
        from csharp_kv.memory import VMM_REFUSAL  # noqa: PLC0415

        # 4 MiB per layer: torch's large pool (expandable segments back both pools, but be plain about it).
        info = v.call("init", instance_id="gpu-check-vmm", num_blocks=4 * BPC, vmm=True, **common)
        out["allocator"] = info.get("allocator", "fakecuda_mark_vmm")
        reg = v.call("register")
        out["registered"] = reg["registered"]
        out["disabled_reason"] = reg["disabled_reason"]
        named = [w for w in reg["warnings"] if "expandable_segments" in w]
        out["warning"] = named[0] if named else None
        req = {"req_id": "vmm-q0", "tokens_seed": salt * 1000 + 900, "num_chunks": 1, "first_block": 0}
        v.call("fill", seed=salt + 900, start=0, count=BPC)
        store = v.call("store", reqs=[req], timeout=30)
        load = v.call("load", reqs=[req], timeout=30)
        out["store"], out["load"] = store, load
        alive = v.call("alive")
        out["ok"] = (not reg["registered"] and VMM_REFUSAL in (reg["disabled_reason"] or "") and bool(named)
                     and store["stored_chunks"] == 0 and load["loaded_chunks"] == 0 and load["failed_blocks"] == BPC
                     and v.proc.poll() is None and sidecar.alive() and not alive["registered"])
    except Exception:  # noqa: BLE001
        out["error"] = traceback.format_exc()


def case_two_engines(a: EngineProcess, b: EngineProcess, common: dict, n: int, salt: int, result: dict) -> None:
    """(b) a chunk stored by engine A's process is loaded by engine B's (another process, same GPU), and back."""
    out = {"ok": False}
    result["checks"]["two_engines"] = out
    try:
        b.call("init", instance_id="gpu-check-b", num_blocks=4 * BPC, **common)
        reg = b.call("register")
        out["b_registered"] = reg["registered"]
        # A: 2 chunks of fresh KV in its load-target blocks, stored; B loads them (asynchronously: get_finished).
        start = 0  # round 0's source blocks of A are verified already; reuse them
        seed = salt + 500
        a.call("fill", seed=seed, start=start, count=2 * BPC, sync=False)
        req = {"req_id": "xfer-a", "tokens_seed": salt * 1000 + 500, "num_chunks": 2, "first_block": start}
        stored = a.call("store", reqs=[req])
        b.call("poison", start=0, count=2 * BPC)
        loaded = b.call("load", reqs=[dict(req, req_id="xfer-b", first_block=0)], is_async=True)
        check = b.call("verify_expected", seed=seed, start=0, count=2 * BPC)
        # And back: B stores, A loads.
        seed2 = salt + 600
        b.call("fill", seed=seed2, start=2 * BPC, count=BPC, sync=False)
        req2 = {"req_id": "xfer-b2", "tokens_seed": salt * 1000 + 600, "num_chunks": 1, "first_block": 2 * BPC}
        stored2 = b.call("store", reqs=[req2])
        a.call("poison", start=start, count=BPC)
        loaded2 = a.call("load", reqs=[dict(req2, req_id="xfer-a2", first_block=start)])
        check2 = a.call("verify_expected", seed=seed2, start=start, count=BPC)
        out.update(a_to_b={"stored": stored["stored_chunks"], "loaded": loaded["loaded_chunks"], "bytes_ok": check["ok"]},
                   b_to_a={"stored": stored2["stored_chunks"], "loaded": loaded2["loaded_chunks"],
                           "bytes_ok": check2["ok"]})
        out["ok"] = (reg["registered"] and stored["stored_chunks"] == 2 and loaded["loaded_chunks"] == 2
                     and loaded["failed_blocks"] == 0 and check["ok"] and stored2["stored_chunks"] == 1
                     and loaded2["loaded_chunks"] == 1 and check2["ok"])
    except Exception:  # noqa: BLE001
        out["error"] = traceback.format_exc()


def case_killed_engine(a, b, k, common, salt, result, sidecar, a_dst) -> None:
    """(c) engine K registers, stores, submits loads and is SIGKILLed; the sidecar keeps serving B (and A): a store
    and load round trip of B verifies, B loads the chunks K stored before it died, A still loads its own."""
    out = {"ok": False}
    result["checks"]["killed_engine"] = out
    try:
        k.call("init", instance_id="gpu-check-k", num_blocks=2 * BPC, **common)
        reg = k.call("register")
        seed_k = salt + 700
        k.call("fill", seed=seed_k, start=0, count=2 * BPC)
        req_k = {"req_id": "k-q0", "tokens_seed": salt * 1000 + 700, "num_chunks": 2, "first_block": 0}
        stored_k = k.call("store", reqs=[req_k])
        # Loads in flight into K's memory when it dies.
        k.call("load_nowait", reqs=[dict(req_k, req_id=f"k-l{i}") for i in range(4)])
        k.kill()
        out["k"] = {"registered": reg["registered"], "stored": stored_k["stored_chunks"],
                    "exit": k.proc.returncode}
        time.sleep(0.5)
        # B: a round trip of its own.
        seed_b = salt + 800
        b.call("fill", seed=seed_b, start=3 * BPC, count=BPC, sync=False)
        req_b = {"req_id": "b-q1", "tokens_seed": salt * 1000 + 800, "num_chunks": 1, "first_block": 3 * BPC}
        stored_b = b.call("store", reqs=[req_b])
        b.call("poison", start=2 * BPC, count=BPC)
        loaded_b = b.call("load", reqs=[dict(req_b, req_id="b-l1", first_block=2 * BPC)])
        check_b = b.call("verify_expected", seed=seed_b, start=2 * BPC, count=BPC)
        # B loads what K stored before it died.
        b.call("poison", start=0, count=2 * BPC)
        loaded_k = b.call("load", reqs=[dict(req_k, req_id="b-lk", first_block=0)])
        check_k = b.call("verify_expected", seed=seed_k, start=0, count=2 * BPC)
        # A (alive all along): a round trip too, compared with its source blocks.
        a.call("fill", seed=salt + 850, start=0, count=BPC, sync=False)
        a_req = {"req_id": "a-rt", "tokens_seed": salt * 1000 + 850, "num_chunks": 1, "first_block": 0}
        stored_a = a.call("store", reqs=[a_req])
        a.call("poison", start=a_dst, count=BPC)
        loaded_a = a.call("load", reqs=[dict(a_req, req_id="a-rt-l", first_block=a_dst)])
        check_a = a.call("verify", pairs=[(a_dst, 0, BPC)])
        stats = b.call("stats")
        out.update(sidecar_alive=sidecar.alive(),
                   b_round_trip={"stored": stored_b["stored_chunks"], "loaded": loaded_b["loaded_chunks"],
                                 "bytes_ok": check_b["ok"]},
                   b_loads_k={"loaded": loaded_k["loaded_chunks"], "bytes_ok": check_k["ok"]},
                   a_round_trip={"stored": stored_a["stored_chunks"], "loaded": loaded_a["loaded_chunks"],
                                 "bytes_ok": check_a["ok"]},
                   copy_errors=stats.get("copy_errors"))
        out["ok"] = (reg["registered"] and stored_k["stored_chunks"] == 2 and sidecar.alive()
                     and stored_b["stored_chunks"] == 1 and loaded_b["loaded_chunks"] == 1 and check_b["ok"]
                     and loaded_k["loaded_chunks"] == 2 and check_k["ok"] and stored_a["stored_chunks"] == 1
                     and loaded_a["loaded_chunks"] == 1 and check_a["ok"] and "error" not in stats)
    except Exception:  # noqa: BLE001
        out["error"] = traceback.format_exc()


def case_sanitizer(tmp, base_env, backend, double_lib, common, salt, result) -> None:
    """Optional: one engine under compute-sanitizer (memcheck): register, store, load, verify; its error summary."""
    out = {"ok": None}
    result["checks"]["sanitizer"] = out
    tool = shutil.which("compute-sanitizer")
    if tool is None or backend != "cuda":
        out["skipped"] = "compute-sanitizer is not on PATH" if tool is None else "only with --backend cuda"
        return
    log = os.path.join(tmp, "sanitizer.txt")
    s = EngineProcess("engine-s", tmp, engine_env(base_env, backend, double_lib),
                      prefix=[tool, "--tool", "memcheck", "--target-processes", "all", "--log-file", log])
    try:
        s.call("init", instance_id="gpu-check-s", num_blocks=4 * BPC, timeout=900, **common)
        s.call("register", timeout=600)
        s.call("fill", seed=salt + 1100, start=0, count=2 * BPC, timeout=600)
        req = {"req_id": "s-q0", "tokens_seed": salt * 1000 + 1100, "num_chunks": 2, "first_block": 0}
        stored = s.call("store", reqs=[req], timeout=600)
        loaded = s.call("load", reqs=[dict(req, req_id="s-l0", first_block=2 * BPC)], timeout=600)
        check = s.call("verify", pairs=[(2 * BPC, 0, 2 * BPC)], timeout=600)
        s.close(timeout=600)
        with open(log, errors="replace") as f:
            text = f.read()
        errors = [int(m) for m in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
        out.update(stored=stored["stored_chunks"], loaded=loaded["loaded_chunks"], bytes_ok=check["ok"],
                   error_summaries=errors, log_tail=text[-2000:])
        out["ok"] = bool(errors) and not any(errors) and check["ok"]
    except Exception:  # noqa: BLE001
        out["error"] = traceback.format_exc()
        s.close(timeout=30)


def host_info() -> dict:
    info = {"host": platform.node(), "os": platform.platform()}
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pcie.link.gen.max,"
                                "pcie.link.width.max", "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=30)
            info["nvidia_smi"] = q.stdout.strip().splitlines()[0] if q.stdout.strip() else q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"failed: {e}"
    return info


# =============================================================================================== report

def fmt_value(value, unit):
    if value is None:
        return "n/a"
    if unit == "B/s":
        return f"{value / 1e9:.2f} GB/s"
    if unit == "s":
        return f"{value * 1e3:.3f} ms"
    return str(value)


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"kvsidecar GPU checks: backend {result['backend']}{' (quick)' if result['quick'] else ''}, "
             f"{result['sizes']['chunks']} chunks of {CHUNK_BYTES >> 20} MiB per round, "
             f"{result['sizes']['rounds']} rounds"]
    lines.append(f"  GPU: {m.get('gpu', '?')}  capability {m.get('capability', '-')}  memory "
                 f"{m.get('gpu_memory_gib', '-')} GiB  uuid {m.get('device_uuid', '?')}")
    lines.append(f"  CUDA driver {m.get('cuda_driver', '?')}  CUDA runtime (torch) {m.get('cuda_runtime', '?')}  torch "
                 f"{m.get('torch', '?')}  Python {m.get('python', '?')}")
    if m.get("nvidia_smi"):
        lines.append(f"  nvidia-smi: {m['nvidia_smi']}")
    lines.append(f"  sidecar: {m.get('sidecar', '?')}; GPU data plane: {m.get('sidecar_gpu', '?')}")
    base = result.get("baseline", {})
    lines.append(f"  baseline: {base.get('kind', '?')}")
    lines.append("")
    header = f"{'figure':<40} {'value':>14} {'baseline':>14} {'ratio':>7}  {'target':<24} {'met':<4}"
    lines.append(header)
    lines.append("-" * len(header))
    for f in result["figures"]:
        ratio = f"{f['ratio']:.2f}" if f["ratio"] is not None else "-"
        met = "-" if f["met"] is None else ("yes" if f["met"] else "no")
        baseline = fmt_value(f["baseline"], f["unit"]) if f["baseline"] is not None else "-"
        lines.append(f"{f['figure']:<40} {fmt_value(f['value'], f['unit']):>14} {baseline:>14} {ratio:>7}  "
                     f"{f['target']:<24} {met:<4}" + (f" {f['note']}" if f.get("note") else ""))
    lines.append("")
    for name, check in result["checks"].items():
        ok = check.get("ok")
        verdict = "skipped" if ok is None else ("PASS" if ok else "FAIL")
        detail = {k: v for k, v in check.items() if k not in ("ok", "error", "log_tail")}
        lines.append(f"{name:<22} {verdict:<7} {json.dumps(detail, default=str)[:300]}")
        if check.get("error"):
            lines.append("    " + check["error"].strip().replace("\n", "\n    "))
    for e in result["errors"]:
        lines.append("ERROR: " + e.strip().replace("\n", "\n    "))
    targets = [f for f in result["figures"] if f["met"] is not None]
    met = sum(1 for f in targets if f["met"])
    lines.append("")
    lines.append(f"RESULT: {'PASS' if result['ok'] else 'FAIL'} (bytes "
                 f"{'verified' if result['checks'].get('bytes_verified', {}).get('ok') else 'NOT verified'}; "
                 f"{met} of {len(targets)} performance targets met"
                 f"{'; figures of the driver double mean nothing' if result['backend'] == 'double' else ''})")
    if not result["ok"] and result.get("sidecar_log_tail"):
        lines.append("sidecar log (last lines):\n" + result["sidecar_log_tail"])
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sidecar", help="kvsidecar executable (self-contained bundle), its directory, or kvsidecar.dll")
    ap.add_argument("--backend", choices=("cuda", "double"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (4 chunks per round)")
    ap.add_argument("--json", help="write the figures and checks to this file")
    ap.add_argument("--double-lib", default="", help="libcuda-double.so (default: $KVSIDECAR_CUDA_LIBRARY, else "
                                                     "built with tests/cuda_double/build.sh)")
    ap.add_argument("--sanitizer", action="store_true", help="also run an engine under compute-sanitizer (cuda)")
    ap.add_argument("--sidecar-arg", action="append", help="an extra sidecar flag, e.g. --sidecar-arg=--Sidecar:"
                                                           "CudaBatchCopies=false (repeatable)")
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (socket, logs)")
    ap.add_argument("--log-dir", help="copy the sidecar's and the engines' logs here at the end")
    ap.add_argument("--engine", metavar="RPC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.engine and not args.sidecar:
        ap.error("--sidecar is required")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine:
        return engine_main(args.engine)
    try:
        result = run(args)
    except SetupError as e:
        print(f"run_gpu_checks: {e}", file=sys.stderr)
        return 2
    print(report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
