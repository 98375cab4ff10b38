#!/usr/bin/env python3
"""Writes hash_vectors.json with an implementation of docs/hashing.md that shares no code with the C#
one (hashlib and struct only). Run: /usr/bin/python3 tests/golden/make_hash_vectors.py"""
import hashlib
import json
import os
import struct

TAG = "kvsidecar/namespace/v1"


def encode_namespace(ns):
    out = b""
    def s(v):
        b = v.encode("utf-8")
        return struct.pack("<I", len(b)) + b
    def i(v):
        return struct.pack("<i", v)
    out += s(TAG) + s(ns["model_id"]) + s(ns["kv_dtype"]) + s(ns["layout_fingerprint"])
    out += i(ns["block_tokens"]) + i(ns["chunk_tokens"]) + i(ns["tp_size"]) + i(ns["tp_rank"])
    out += i(ns["kv_group"]) + i(ns["format_version"]) + s(ns["cache_salt"])
    return out


def keys(root, chunk_tokens, tokens):
    out, prev = [], root
    for c in range(len(tokens) // chunk_tokens):
        chunk = tokens[c * chunk_tokens:(c + 1) * chunk_tokens]
        prev = hashlib.sha256(prev + struct.pack("<%dI" % len(chunk), *chunk)).digest()
        out.append(prev)
    return out


def lcg(seed, n, modulus):
    """x = (1103515245 x + 12345) mod 2^31; token = x mod modulus."""
    x, out = seed, []
    for _ in range(n):
        x = (1103515245 * x + 12345) % (1 << 31)
        out.append(x % modulus)
    return out


def ns(**kw):
    base = dict(model_id="meta-llama/Meta-Llama-3-8B", kv_dtype="bfloat16", layout_fingerprint="0123456789abcdef0123456789abcdef",
                block_tokens=16, chunk_tokens=256, tp_size=1, tp_rank=0, kv_group=0, format_version=1, cache_salt="")
    base.update(kw)
    return base


CASES = [
    ("plain", ns(), lcg(1, 600, 128000)),
    ("salted", ns(cache_salt="tenant-a"), lcg(1, 600, 128000)),
    ("other_salt", ns(cache_salt="tenant-b"), lcg(1, 600, 128000)),
    ("unicode_salt", ns(cache_salt="t\u00e9nant-\u4e2d"), lcg(2, 512, 32000)),
    ("replicated_mla", ns(model_id="deepseek-ai/DeepSeek-V3", tp_size=8, tp_rank=-1, block_tokens=64, chunk_tokens=256), lcg(3, 520, 129280)),
    ("tp_rank_1", ns(tp_size=2, tp_rank=1), lcg(1, 600, 128000)),
    ("chunk_16", ns(chunk_tokens=16), lcg(4, 50, 50000)),
    ("max_token_ids", ns(chunk_tokens=16), [0xFFFFFFFF, 0, 0x80000000, 1] * 8),
    ("partial_only", ns(), lcg(5, 255, 128000)),
    ("empty", ns(), []),
]


def main():
    vectors = []
    for name, n, tokens in CASES:
        enc = encode_namespace(n)
        root = hashlib.sha256(enc).digest()
        vectors.append({
            "name": name,
            "namespace": n,
            "namespace_encoding_hex": enc.hex(),
            "root_hex": root.hex(),
            "chunk_tokens": n["chunk_tokens"],
            "tokens": tokens,
            "keys_hex": [k.hex() for k in keys(root, n["chunk_tokens"], tokens)],
        })
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hash_vectors.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"spec": "docs/hashing.md", "vectors": vectors}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
