"""The fake engine drives the real shim against the real sidecar process: every scenario of
engines.md 6.3 that applies to a cache, with the loaded KV checked byte for byte after every load."""

import pytest

from fake_engine.engine import EngineOptions, FakeEngine, SidecarProcess


def run_requests(engine, requests):
    from vllm.v1.request import Request

    for req_id, prompt, kwargs in requests:
        engine.add(Request(req_id, prompt, max_tokens=kwargs.get("max_tokens", 4), cache_salt=kwargs.get("salt")))
    engine.run()


def prompt(n, seed):
    return [(seed * 7919 + i * 104729) % 30000 + 1000 for i in range(n)]


@pytest.fixture
def engine_factory(sidecar):
    engines = []

    def make(**kw):
        e = FakeEngine(sidecar.socket_path, EngineOptions(**kw))
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()


def external(engine, req_id_prefix=None):
    return engine.scheduler.external_tokens


@pytest.mark.parametrize("era,runner", [("kv_first", "v2"), ("blocks_first", "v2"), ("packed", "v2"),
                                        ("shared_views", "v2"), ("blocks_first", "v1")])
def test_cold_then_warm_prompt_loads_exact_bytes(engine_factory, era, runner):
    e = engine_factory(era=era, runner=runner)
    p = prompt(300, 1)
    run_requests(e, [("cold", p, {})])
    assert e.scheduler.external_tokens == 0
    run_requests(e, [("warm", p, {})])
    # 300 prompt tokens + 3 computed outputs -> 4 full 64-token chunks stored; the warm prompt may use 256.
    assert e.scheduler.external_tokens == 256
    assert e.mismatches == []
    stats = e.worker_stats()[0]
    assert stats["loaded_chunks"] == 4 and stats["load_errors"] == 0


def test_shared_system_prompt_hits_across_requests(engine_factory):
    e = engine_factory()
    system = prompt(200, 2)
    run_requests(e, [("u1", system + prompt(50, 3), {})])
    run_requests(e, [("u2", system + prompt(60, 4), {}), ("u3", system + prompt(70, 5), {})])
    assert e.scheduler.external_tokens == 2 * 192  # three full chunks of the system prompt each
    assert e.mismatches == []


def test_chunked_prefill_stores_chunks_as_they_complete(engine_factory):
    e = engine_factory(max_num_batched_tokens=48)
    p = prompt(500, 6)
    run_requests(e, [("cold", p, {})])
    assert e.connector.stats()["stores_planned"] >= 7  # one store per step that completed a chunk, never per block
    run_requests(e, [("warm", p, {})])
    assert e.scheduler.external_tokens == 448
    assert e.mismatches == []


def test_preemption_and_resume_recover_from_the_cache(engine_factory):
    e = engine_factory(num_blocks=20, max_num_batched_tokens=512)
    reqs = [(f"r{i}", prompt(150, 10 + i), {"max_tokens": 60}) for i in range(3)]
    run_requests(e, reqs)
    preempted = sum(r.num_preemptions for r in e.scheduler.finished)
    assert preempted > 0, "the block pool was meant to force a preemption"
    assert len(e.scheduler.finished) == 3
    assert e.scheduler.external_tokens > 0  # resumed requests reloaded what they had stored
    assert e.mismatches == []


def test_two_tensor_parallel_ranks_each_load_their_own_kv(engine_factory):
    e = engine_factory(tp=2)
    p = prompt(300, 7)
    run_requests(e, [("cold", p, {})])
    run_requests(e, [("warm", p, {})])
    assert e.scheduler.external_tokens == 256
    assert e.mismatches == []
    assert [s["loaded_chunks"] for s in e.worker_stats()] == [4, 4]


def test_partial_last_chunk_is_not_served_and_full_prompt_leaves_a_token(engine_factory):
    e = engine_factory(runner="v1")
    p = prompt(100, 8)
    run_requests(e, [("a", p, {"max_tokens": 1})])
    run_requests(e, [("b", p, {})])
    assert e.scheduler.external_tokens == 64  # the trailing 36 tokens were never a full chunk
    exact = prompt(64, 9)
    run_requests(e, [("c", exact + prompt(64, 10), {"max_tokens": 1})])
    before = e.scheduler.external_tokens
    run_requests(e, [("d", exact, {})])
    # A 64-token prompt whose whole chunk is cached still computes its last block: 48 tokens load,
    # the chunk's last block is skipped (-1) and recomputed.
    assert e.scheduler.external_tokens - before == 48
    assert e.mismatches == []


def test_async_load_waits_for_remote_kvs(engine_factory):
    e = engine_factory(extra_config={"async_load": True})
    p = prompt(300, 11)
    run_requests(e, [("cold", p, {})])
    run_requests(e, [("warm", p, {})])
    assert e.scheduler.external_tokens == 256
    assert e.mismatches == []
    assert e.worker_stats()[0]["loaded_chunks"] == 4


def test_cache_salt_isolates_tenants(engine_factory):
    e = engine_factory()
    p = prompt(300, 12)
    run_requests(e, [("a", p, {"salt": "tenant-a"})])
    run_requests(e, [("b", p, {"salt": "tenant-b"}), ("c", p, {})])
    assert e.scheduler.external_tokens == 0
    run_requests(e, [("d", p, {"salt": "tenant-a"})])
    assert e.scheduler.external_tokens == 256
    assert e.mismatches == []


def test_sidecar_killed_mid_load_blocks_are_recomputed(sidecar, engine_factory):
    e = engine_factory()
    p = prompt(300, 13)
    run_requests(e, [("cold", p, {})])
    original = e.connector.build_connector_meta

    def kill_after_planning(so):
        meta = original(so)
        if meta.loads:
            sidecar.kill()  # the lookup said "hit", the load will find no sidecar
        return meta

    e.connector.build_connector_meta = kill_after_planning
    run_requests(e, [("warm", p, {})])
    assert e.scheduler.finished[-1].request_id == "warm"
    assert e.scheduler.finished[-1].num_output_tokens == 4
    stats = e.worker_stats()[0]
    assert stats["load_errors"] == 1 and stats["failed_blocks"] == 16
    assert e.mismatches == []


def test_sidecar_restarted_engine_reconnects_and_hits_again(sidecar, engine_factory):
    import time

    e = engine_factory()
    run_requests(e, [("a", prompt(300, 14), {})])
    sidecar.kill()
    run_requests(e, [("b", prompt(300, 15), {})])  # no sidecar: runs, misses, no hang
    sidecar.start()
    time.sleep(0.5)  # past the reconnect backoff
    p = prompt(300, 16)
    run_requests(e, [("c", p, {})])
    run_requests(e, [("d", p, {})])
    assert e.scheduler.external_tokens == 256
    assert e.mismatches == []
    assert e.worker_stats()[0]["client_reconnects"] >= 1


def test_sidecar_absent_at_start_engine_runs_without_cache(tmp_path):
    e = FakeEngine(str(tmp_path / "nobody.sock"), EngineOptions())
    try:
        p = prompt(300, 17)
        run_requests(e, [("a", p, {}), ("b", p, {})])
        assert len(e.scheduler.finished) == 2
        assert e.scheduler.external_tokens == 0
        assert e.connector.stats()["client_connects"] == 0
    finally:
        e.close()


def test_one_round_trip_per_request_for_lookup_load_and_store(engine_factory):
    e = engine_factory(max_num_batched_tokens=4096)
    prompts = [prompt(300, 20 + i) for i in range(4)]
    run_requests(e, [(f"cold{i}", p, {"max_tokens": 1}) for i, p in enumerate(prompts)])
    run_requests(e, [(f"warm{i}", p, {"max_tokens": 1}) for i, p in enumerate(prompts)])
    s, w = e.connector.stats(), e.worker_stats()[0]
    # One lookup per request, plus one more for a hit the scheduler did not admit in its step (its lease is
    # given back at once and the lookup sent again for the next step).
    assert s["lookups"] == 8 + s["leases_released_unadmitted"]
    assert s["leases_released_unadmitted"] <= 4
    assert w["loads"] == 4
    assert w["stores"] == 4  # the warm requests add no new full chunk
    assert e.mismatches == []


def test_local_prefix_cache_and_sidecar_split_a_chunk(engine_factory):
    # The engine's own prefix cache keeps the head of the prompt, the sidecar serves the rest: the
    # LOAD names the chunk that straddles both, with -1 for the blocks vLLM already holds.
    e = engine_factory(num_blocks=30, enable_prefix_caching=True)
    a = prompt(300, 30)
    run_requests(e, [("a", a, {})])
    run_requests(e, [("c", prompt(250, 31), {})])  # reuses (evicts) the cached blocks of a's tail
    local_before, ext_before = e.scheduler.local_tokens, e.scheduler.external_tokens
    run_requests(e, [("b", a, {})])
    local = e.scheduler.local_tokens - local_before
    ext = e.scheduler.external_tokens - ext_before
    assert 0 < local < 256, f"the local prefix cache should hold only the head of the prompt (held {local})"
    assert local + ext == 256
    assert ext % 16 == 0 and ext > 0
    assert e.mismatches == []
