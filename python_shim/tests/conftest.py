"""Puts the shim on sys.path and, only when no real vLLM is importable, the vLLM fakes."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.dirname(HERE)
REPO = os.path.dirname(SHIM)
sys.path.insert(0, SHIM)


def _real_vllm_installed() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    # A namespace package (origin None) is only a folder named vllm, e.g. integration/vllm: not vLLM.
    return spec is not None and spec.origin is not None and "fakes" not in spec.origin


if not _real_vllm_installed():
    sys.path.insert(0, os.path.join(HERE, "fakes"))

GOLDEN = os.path.join(REPO, "tests", "golden")
