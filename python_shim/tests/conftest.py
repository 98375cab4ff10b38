"""Puts the shim on sys.path and, only when no real vLLM is importable, the vLLM fakes."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.dirname(HERE)
REPO = os.path.dirname(SHIM)
sys.path.insert(0, SHIM)
try:
    import vllm  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(HERE, "fakes"))

GOLDEN = os.path.join(REPO, "tests", "golden")
