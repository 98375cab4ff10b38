"""Self-tests of the fake engine, with a programmable stub connector and no sidecar: that each vLLM version's
surface and call order is what engines.md / engines-drift.md describe, and that the engine's own checks
(delayed frees, block leaks, API violations, the livelock guard, load-failure handling) catch what they are
meant to catch."""

import importlib

import pytest

from fake_engine import api as fake_api
from fake_engine.engine import EngineOptions, FakeEngine
from fake_engine.errors import BlockLeak, ContractViolation, EngineStuck, Livelock

STUB = ("fake_engine.stub_connector", "StubConnector")
LAYERS = 4


def prompt(n, seed):
    return [(seed * 7919 + i * 104729) % 30000 + 1000 for i in range(n)]


@pytest.fixture
def stub_engine(tmp_path):
    engines = []

    def make(api="v029", cfg=None, **opts):
        e = FakeEngine(str(tmp_path / "unused.sock"), EngineOptions(api=api, connector=STUB, extra_config=dict(cfg or {}),
                                                                     num_layers=LAYERS, **opts))
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()
    fake_api.activate(None)


def run(engine, requests, **run_kw):
    from vllm.v1.request import Request

    for req_id, prompt_ids, max_tokens in requests:
        engine.add(Request(req_id, prompt_ids, max_tokens=max_tokens))
    engine.run(**run_kw)
    assert engine.mismatches == [], "\n".join(engine.mismatches)
    assert engine.violations == [], "\n".join(engine.violations)


def log(engine, kind):
    return [entry for entry in engine.connector.log if entry[0] == kind]


# ------------------------------------------------------------------------------------------ surface

NEW_HOOKS = ["get_transfer_results", "bind_kv_cache_manager", "finish_forward", "reset_capture_state",
             "get_mem_pool_context", "has_pending_block_frees", "can_load_prefix_replay_checkpoint",
             "consume_prefix_replay_checkpoint", "register_finished_partial_tail", "supports_divergent_local_hybrid_hits"]
REMOVED_HOOKS = ["prefer_cross_layer_blocks", "register_cross_layers_kv_cache", "supports_eagle_prefix_cache_hashing",
                 "set_eagle_prefix_cache_hashing"]
ABSTRACT = {"start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save", "get_num_new_matched_tokens",
            "update_state_after_alloc", "build_connector_meta"}


@pytest.mark.parametrize("api", ["v029", "newest"])
def test_surface_follows_the_selected_api(api):
    fake_api.activate(api)
    try:
        base = importlib.import_module("vllm.distributed.kv_transfer.kv_connector.v1.base")
        outputs = importlib.import_module("vllm.v1.outputs")
        from vllm.config import VllmConfig
        from vllm.config.kv_transfer import KVTransferConfig

        newest = api == "newest"
        assert importlib.import_module("vllm").FAKE_VLLM_API == api
        assert hasattr(base, "KVConnectorTransferResults") == newest
        cls = base.KVConnectorBase_V1
        assert set(cls.__abstractmethods__) == ABSTRACT
        for name in NEW_HOOKS:
            assert hasattr(cls, name) == newest, name
        for name in REMOVED_HOOKS:
            assert hasattr(cls, name) == (not newest), name
        assert ("failed_recving" in outputs.KVConnectorOutput.__dataclass_fields__) == newest

        class Minimal(cls):
            bound = None

            def start_load_kv(self, forward_context, **kwargs): ...
            def wait_for_layer_load(self, layer_name): ...
            def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs): ...
            def wait_for_save(self): ...
            def get_num_new_matched_tokens(self, request, num_computed_tokens): return 0, False
            def update_state_after_alloc(self, request, blocks, num_external_tokens): ...
            def build_connector_meta(self, scheduler_output): ...
            def get_finished(self, finished_req_ids): return {"s"}, {"r"}
            def bind_gpu_block_pool(self, gpu_block_pool): self.bound = gpu_block_pool

        c = Minimal(VllmConfig(kv_transfer_config=KVTransferConfig(kv_connector="x", kv_role="kv_both")),
                    base.KVConnectorRole.WORKER, None)
        if newest:
            res = c.get_transfer_results({"s"})
            assert (res.finished_sending, res.finished_recving, res.failed_recving) == ({"s"}, {"r"}, set())
            manager = type("M", (), {"block_pool": "pool"})()
            c.bind_kv_cache_manager(manager)
            assert c.bound == "pool" and c._kv_cache_manager is manager
            assert c.get_mem_pool_context() is None and c.has_pending_block_frees() is False
            assert c.register_finished_partial_tail(None, ([],), []) is False
            assert c.supports_divergent_local_hybrid_hits is False
    finally:
        fake_api.activate(None)


def test_one_process_switches_versions_engine_by_engine(stub_engine):
    for api in ("v029", "newest", "v029"):
        e = stub_engine(api)
        assert hasattr(e.connector, "get_transfer_results") == (api == "newest")
        run(e, [("a", prompt(40, 1), 2)])


# ------------------------------------------------------------------------------------------ call order

def _collapse(calls):
    """Per-layer hooks folded into one "layers" entry."""
    out = []
    for name in calls:
        name = "layers" if name in ("wait_for_layer_load", "save_kv_layer") else name
        if not (name == "layers" and out and out[-1] == "layers"):
            out.append(name)
    return out


TAIL_V029_V2 = ["get_finished", "get_block_ids_with_load_errors", "get_kv_connector_stats",
                "get_kv_connector_kv_cache_events", "build_connector_worker_meta", "clear_connector_metadata"]
TAIL_NEWEST = ["get_transfer_results", "get_block_ids_with_load_errors", "get_kv_connector_stats",
               "get_kv_connector_kv_cache_events", "build_connector_worker_meta"]


@pytest.mark.parametrize("api,runner,async_load,defer,forward_step,empty_step", [
    ("v029", "v2", False, False,
     ["handle_preemptions", "bind_connector_metadata", "start_load_kv", "layers", "wait_for_save"] + TAIL_V029_V2, None),
    ("v029", "v2", True, False,
     ["handle_preemptions", "bind_connector_metadata", "layers", "start_load_kv", "wait_for_save"] + TAIL_V029_V2,
     ["handle_preemptions", "bind_connector_metadata", "start_load_kv"] + TAIL_V029_V2),
    ("v029", "v1", False, False,
     ["bind_connector_metadata", "start_load_kv", "layers", "wait_for_save", "get_finished",
      "get_block_ids_with_load_errors", "get_kv_connector_stats", "clear_connector_metadata"], None),
    ("newest", "v2", False, False,
     ["handle_preemptions", "bind_connector_metadata", "start_load_kv", "layers", "finish_forward", "wait_for_save"]
     + TAIL_NEWEST + ["clear_connector_metadata"], None),
    ("newest", "v2", True, False,
     ["handle_preemptions", "bind_connector_metadata", "layers", "finish_forward", "start_load_kv", "wait_for_save"]
     + TAIL_NEWEST + ["clear_connector_metadata"],
     ["handle_preemptions", "bind_connector_metadata", "finish_forward", "start_load_kv", "wait_for_save"]
     + TAIL_NEWEST + ["clear_connector_metadata"]),
    ("newest", "v1", True, False,
     ["bind_connector_metadata", "layers", "start_load_kv", "wait_for_save"] + TAIL_NEWEST + ["clear_connector_metadata"],
     ["bind_connector_metadata", "start_load_kv", "wait_for_save"] + TAIL_NEWEST + ["clear_connector_metadata"]),
    ("newest", "v1", False, True,
     ["bind_connector_metadata", "start_load_kv", "layers"] + TAIL_NEWEST + ["wait_for_save", "clear_connector_metadata"],
     None),
])
def test_worker_calls_the_connector_in_the_version_s_order(stub_engine, api, runner, async_load, defer, forward_step,
                                                           empty_step):
    e = stub_engine(api, {"hit_tokens": 128, "async_load": async_load}, runner=runner, defer_finalize=defer,
                    record_calls=True)
    run(e, [("a", prompt(200, 2), 3)])
    steps = [(s, _collapse(s["ranks"][0])) for s in e.call_log]
    forward = [calls for s, calls in steps if s["scheduled"] > 0]
    empty = [calls for s, calls in steps if s["scheduled"] == 0]
    first = forward[0]
    assert first == forward_step, f"first forward step ({'sync loads' if steps[0][0]['sync_loads'] else 'no sync loads'}): {first}"
    if empty_step is not None:
        assert empty and empty[0] == empty_step, f"empty step: {empty[:1]}"
    sched = e.connector.log
    assert sched[0][0] == "bind_gpu_block_pool", sched[:2]  # newest: through bind_kv_cache_manager's default
    stats_calls = len(log(e, "get_kv_connector_stats"))
    assert stats_calls == (e.steps if api == "newest" else 0), stats_calls


def test_newest_start_load_kv_gets_kwargs(stub_engine):
    e = stub_engine("newest", {"hit_tokens": 128})
    run(e, [("a", prompt(200, 3), 2)])
    worker_log = e.worker_stats()[0]["log"]
    assert all(entry[1] == ["attn_metadata", "input_batch"] for entry in worker_log if entry[0] == "start_load_kv")


# ------------------------------------------------------------------------------------------ scheduler rules

def test_newest_asks_with_the_block_aligned_local_hit_and_applies_the_partial_tail_rules(stub_engine):
    e = stub_engine("newest", {"hit_tokens": 0}, enable_prefix_caching=True, local_partial_tail=True)
    b = prompt(400, 4)
    run(e, [("a", b[:250], 1)])                        # local cache: 15 full blocks + a 10-token tail
    e.connector.cfg["hit_tokens"] = 256
    run(e, [("b", b, 1)])
    assert ("lookup", "b", 240) in e.connector.log     # the aligned local hit, not 250
    rec = e.scheduler.records["b"]
    assert (rec.local_tokens, rec.claimed_external) == (240, 16)   # the remote hit covers the tail: truncated
    e.connector.cfg["hit_tokens"] = 192
    run(e, [("c", b[:250] + prompt(60, 5), 1)])
    assert ("lookup", "c", 240) in e.connector.log
    rec = e.scheduler.records["c"]
    assert (rec.local_tokens, rec.claimed_external) == (250, 0)    # the tail wins, copied into c's own block


def test_v029_asks_with_the_full_block_local_hit(stub_engine):
    e = stub_engine("v029", {"hit_tokens": 256}, enable_prefix_caching=True)
    b = prompt(300, 6)
    run(e, [("a", b[:250], 1)])
    run(e, [("b", b, 1)])
    assert ("lookup", "b", 240) in e.connector.log
    assert e.scheduler.records["b"].claimed_external == 16


def test_refused_async_admission_is_asked_again_without_update_state_after_alloc(stub_engine):
    e = stub_engine("newest", {"hit_tokens": 128, "async_load": True}, refuse_async_admission_every=2)
    run(e, [("a", prompt(200, 7), 2)])
    calls = [entry[0] for entry in e.connector.log if entry[0] in ("lookup", "alloc") and entry[1] == "a"]
    assert calls[:3] == ["lookup", "lookup", "alloc"], calls
    assert e.scheduler.records["a"].refused_admissions == 1 and e.scheduler.records["a"].load_attempts == 1


@pytest.mark.parametrize("api", ["v029", "newest"])
def test_not_yet_answers_are_retried(stub_engine, api):
    e = stub_engine(api, {"hit_tokens": 128, "not_yet": 3})
    run(e, [("a", prompt(200, 8), 2)])
    rec = e.scheduler.records["a"]
    assert (rec.not_yet, rec.lookups, rec.claimed_external) == (3, 4, 128)


# ------------------------------------------------------------------------------------------ delayed frees

@pytest.mark.parametrize("api", ["v029", "newest"])
def test_delayed_free_holds_blocks_until_every_rank_reported(stub_engine, api):
    e = stub_engine(api, {"delay_free": True, "sending_after": [1, 4]}, tp=2)
    held_while_pending = []

    def sample(so):
        if "a" in e.scheduler.holds:
            blocks = e.scheduler.blocks["a"]
            held_while_pending.append(not (set(blocks) & set(e.scheduler.pool.free)))

    e.on_scheduled = sample
    run(e, [("a", prompt(100, 9), 2)])
    assert len(held_while_pending) >= 3, "rank 1 reports 4 calls late: the blocks should have waited that long"
    assert all(held_while_pending), "a delayed request's blocks went back to the pool before finished_sending"
    assert e.scheduler.pool.all_free()


@pytest.mark.parametrize("api", ["v029", "newest"])
def test_delayed_free_that_never_reports_fails_the_run(stub_engine, api):
    e = stub_engine(api, {"delay_free": True, "never_send": True})
    with pytest.raises(EngineStuck, match=r"holds \['sending'\]"):
        run(e, [("a", prompt(100, 10), 2)], max_steps=50)


def test_blocks_still_allocated_with_no_request_left_is_a_leak(stub_engine):
    e = stub_engine("v029", {})
    run(e, [("a", prompt(100, 11), 2)])
    e.scheduler.pool.touch(3)
    with pytest.raises(BlockLeak, match=r"blocks \[3\]"):
        e.check_drained()


@pytest.mark.parametrize("api", ["v029", "newest"])
def test_finished_sending_for_a_request_that_was_not_delayed_is_a_violation(stub_engine, api):
    e = stub_engine(api, {"send_undelayed": True})
    with pytest.raises(ContractViolation, match="request_finished"):
        run(e, [("a", prompt(100, 12), 2)])


# ------------------------------------------------------------------------------------------ load failures

@pytest.mark.parametrize("api,report", [("v029", "blocks"), ("newest", "blocks"), ("newest", "failed_recving")])
def test_failed_async_load_is_recomputed_and_asked_again(stub_engine, api, report):
    e = stub_engine(api, {"hit_tokens": 128, "async_load": True, "fail_loads": 1, "fail_report": report})
    run(e, [("a", prompt(200, 13), 2)])
    req = e.scheduler.finished[-1]
    assert req.status.name == "FINISHED_LENGTH_CAPPED"
    rec = e.scheduler.records["a"]
    assert (rec.load_attempts, rec.failed_loads) == (1, 1)
    assert [entry[2] for entry in log(e, "lookup")] == [0, 0]   # asked again from scratch, answered (0, False)
    assert rec.prompt_tokens_computed == 200


def test_failed_recving_with_the_fail_policy_finishes_the_request_with_an_error(stub_engine):
    e = stub_engine("newest", {"hit_tokens": 128, "async_load": True, "fail_loads": 1, "fail_report": "failed_recving"},
                    kv_load_failure_policy="fail")
    run(e, [("a", prompt(200, 14), 2)])
    assert e.scheduler.finished[-1].status.name == "FINISHED_ERROR"
    assert e.scheduler.pool.all_free()


@pytest.mark.parametrize("api", ["v029", "newest"])
def test_failed_sync_load_is_truncated_and_recomputed(stub_engine, api):
    e = stub_engine(api, {"hit_tokens": 128, "fail_loads": 1})
    run(e, [("a", prompt(200, 15), 2)])
    rec = e.scheduler.records["a"]
    assert (rec.load_attempts, rec.failed_loads, rec.lookups) == (1, 1, 1)
    assert rec.prompt_tokens_computed >= 200


@pytest.mark.parametrize("api", ["v029", "newest"])
def test_a_hit_offered_again_after_every_failed_load_is_a_livelock(stub_engine, api):
    e = stub_engine(api, {"hit_tokens": 128, "async_load": True, "fail_loads": 100, "reoffer_after_failure": True},
                    max_load_attempts=3)
    with pytest.raises(Livelock, match="given an external hit 4 times"):
        run(e, [("a", prompt(200, 16), 2)])
