"""A fake of vLLM's import surface for the shim's tests (engines.md 6.3). Never importable when a real
vLLM is installed: conftest.py only puts it on sys.path if ``import vllm`` fails."""

__version__ = "0.29.0+fake"

# Which upstream behaviour the fakes reproduce.
FAKE_VLLM_API_VERSION = 3
FAKE_VLLM_API_VERSIONS = {
    1: "v0.22: kv-first layouts, handle_preemptions(set), MR V1 only",
    2: "v0.28: packed K/V layout, MR V2 default, resumed requests in scheduled_new_reqs",
    3: "main after #51718/#53333 (late Aug 2026): strided per-layer views, handle_preemptions(metadata), has_sync_kv_loads",
}
