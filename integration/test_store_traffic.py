"""Store traffic is linear in the tokens a request generates: each STORE after a request's first carries only
its new chunks' tokens and the sealed chain state of the last reply (docs/protocol.md, STORE), and the chunks
stored that way are found again by a prompt of the whole sequence."""

from test_scenarios import engine_factory, prompt, run_requests  # noqa: F401 - the fixture is used by name


def test_long_generation_sends_each_token_once_and_its_chunks_hit_again(engine_factory):  # noqa: F811
    e = engine_factory(num_blocks=256, max_num_batched_tokens=2048)
    run_requests(e, [("long", prompt(128, 31), {"max_tokens": 1920})])
    generated = next(r for r in e.scheduler.finished if r.request_id == "long")
    total = len(generated.all_token_ids)
    assert total == 2048
    w = e.worker_stats()[0]
    # 31 full chunks of 64 tokens have their KV computed (the last token's KV is not), stored in 30 stores: the
    # prompt's 2 chunks, then one per chunk generated. Re-sending the prefix each time would cost about 16x this.
    stored_tokens = 31 * 64
    assert w["stores"] == 30
    assert stored_tokens * 4 <= w["store_token_bytes"] <= 2 * stored_tokens * 4, w["store_token_bytes"]

    # The chunks keyed from resumed chains are the chunks of the whole sequence.
    run_requests(e, [("again", list(generated.all_token_ids), {"max_tokens": 1})])
    assert e.scheduler.external_tokens == stored_tokens
    assert e.mismatches == []
