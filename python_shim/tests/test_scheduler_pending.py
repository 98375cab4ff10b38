"""A sidecar that keeps answering LOOKUP "pending" (lower tiers being promoted) is asked again each step, but
the scheduler gives the request a miss once lookup_timeout_ms has passed since the first ask: a stuck promotion
never holds a request back."""

import time
from types import SimpleNamespace

from csharp_kv import protocol as p
from csharp_kv.config import ShimConfig
from csharp_kv.vllm.scheduler import SchedulerSide
from stand_in import StandIn


def test_endless_pending_turns_into_a_miss_after_lookup_timeout(tmp_path):
    path = str(tmp_path / "s.sock")
    sidecar = StandIn(path, replies={p.Opcode.LOOKUP: [0, 0, 0, int(p.LookupState.PENDING)]})
    sidecar.hello.set()
    cfg = ShimConfig.from_extra_config({"socket_path": path, "chunk_tokens": 32, "lookup_timeout_ms": 300,
                                        "lookup_wait_ms": 50}, 16)
    side = SchedulerSide(cfg, "engine", 16)
    try:
        request = SimpleNamespace(request_id="r", prompt_token_ids=list(range(100)), all_token_ids=list(range(100)),
                                  num_tokens=100, cache_salt=None)
        started = time.monotonic()
        answers = []
        while time.monotonic() - started < 5:
            answer = side.get_num_new_matched_tokens(request, 0)
            answers.append(answer)
            if answer[0] is not None:
                break
            time.sleep(0.02)
        assert answers[0] == (None, False)  # "not yet" while pending
        assert answers[-1] == (0, False)  # then a miss: the request is computed
        assert sidecar.requests.count(p.Opcode.LOOKUP) >= 2  # it was asked again
        assert side.stats["lookup_timeouts"] == 1
    finally:
        side.client.close()
        sidecar.close()
