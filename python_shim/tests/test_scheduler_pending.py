"""A sidecar that keeps answering LOOKUP "pending" (lower tiers being promoted) is asked again each step, but
the scheduler gives the request a miss once lookup_timeout_ms has passed since the first ask: a stuck promotion
never holds a request back."""

import os
import socket
import threading
import time
from types import SimpleNamespace

from csharp_kv import protocol as p
from csharp_kv.config import ShimConfig
from csharp_kv.vllm.scheduler import SchedulerSide


class PendingSidecar:
    """Answers HELLO, and every LOOKUP with state Pending; counts the lookups."""

    def __init__(self, path):
        self.lookups = 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while len(buf) >= p.HEADER_SIZE:
                h = p.decode_header(buf)
                if len(buf) < p.HEADER_SIZE + h.body_length:
                    break
                buf = buf[p.HEADER_SIZE + h.body_length:]
                if h.opcode == p.Opcode.HELLO:
                    fields = [1, "test", ["host-memory"], 1 << 20, 1, os.getpid()]
                elif h.opcode == p.Opcode.LOOKUP:
                    self.lookups += 1
                    fields = [0, 0, 0, int(p.LookupState.PENDING)]
                else:
                    fields = []
                conn.sendall(p.encode_frame(h.opcode, h.request_id, fields, flags=p.FLAG_REPLY))

    def close(self):
        self.server.close()


def test_endless_pending_turns_into_a_miss_after_lookup_timeout(tmp_path):
    path = str(tmp_path / "s.sock")
    sidecar = PendingSidecar(path)
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
        assert sidecar.lookups >= 2  # it was asked again
        assert side.stats["lookup_timeouts"] == 1
    finally:
        side.client.close()
        sidecar.close()
