"""A fake of vLLM's import surface for the shim's tests (engines.md 6.3). Never importable when a real
vLLM is installed: conftest.py only puts it on sys.path if ``import vllm`` fails.

Which upstream version the fake follows is chosen at import time by the environment variable
``FAKE_VLLM_API``:

* ``v029`` (default): vLLM up to about v0.29 as engines.md describes it;
* ``newest``: upstream 00f4240e as engines-drift.md sections 1-2 describe it (``KVConnectorTransferResults``,
  ``get_transfer_results``, ``failed_recving``, ``bind_kv_cache_manager`` and the other new optional hooks;
  the cross-layer and EAGLE-hashing hooks removed).

A process imports one of the two; the fake engine (integration/fake_engine/api.py) re-imports the package
when a test asks for the other one, and passes the variable on to its worker processes."""

import os

FAKE_VLLM_API_ENV = "FAKE_VLLM_API"
FAKE_VLLM_APIS = ("v029", "newest")
FAKE_VLLM_API = os.environ.get(FAKE_VLLM_API_ENV) or "v029"
if FAKE_VLLM_API not in FAKE_VLLM_APIS:
    raise ImportError(f"{FAKE_VLLM_API_ENV}={FAKE_VLLM_API!r}: the fake vLLM follows one of {FAKE_VLLM_APIS}")
NEWEST = FAKE_VLLM_API == "newest"

__version__ = "0.33.0.dev0+fake" if NEWEST else "0.29.0+fake"

# Which upstream behaviour the fakes reproduce.
FAKE_VLLM_API_VERSION = 4 if NEWEST else 3
FAKE_VLLM_API_VERSIONS = {
    1: "v0.22: kv-first layouts, handle_preemptions(set), MR V1 only",
    2: "v0.28: packed K/V layout, MR V2 default, resumed requests in scheduled_new_reqs",
    3: "main after #51718/#53333 (late Aug 2026): strided per-layer views, handle_preemptions(metadata), has_sync_kv_loads",
    4: "upstream 00f4240e (engines-drift.md, FAKE_VLLM_API=newest): KVConnectorTransferResults and get_transfer_results "
       "with failed_recving, bind_kv_cache_manager, finish_forward, block-aligned local hits, wait_for_save every step, "
       "cross-layer and EAGLE-hashing hooks removed",
}
