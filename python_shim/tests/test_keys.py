import json
import os

import pytest

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests", "golden")
from csharp_kv import keys


def _vectors():
    with open(os.path.join(GOLDEN, "hash_vectors.json")) as f:
        return json.load(f)["vectors"]


@pytest.mark.parametrize("v", _vectors(), ids=lambda v: v["name"])
def test_golden_vector(v):
    ns = v["namespace"]
    encoding = keys.encode_namespace(ns["model_id"], ns["kv_dtype"], ns["layout_fingerprint"], ns["block_tokens"],
                                     ns["chunk_tokens"], ns["tp_size"], ns["tp_rank"], ns["kv_group"],
                                     ns["format_version"], ns["cache_salt"])
    assert encoding.hex() == v["namespace_encoding_hex"]
    root = keys.root_key(encoding)
    assert root.hex() == v["root_hex"]
    assert [k.hex() for k in keys.chunk_keys(root, v["chunk_tokens"], v["tokens"])] == v["keys_hex"]
