"""Integration tests: the real shim, the real sidecar process, real torch tensors, the fake engine."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fake_engine.engine import ensure_import_paths  # noqa: E402
from fake_engine.sidecar import NOT_BUILT, SidecarProcess, sidecar_bin  # noqa: E402

ensure_import_paths()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cuda_double():
    """The path of the CUDA driver double (tests/cuda_double), built once; the test skips where it cannot be built."""
    import subprocess

    from fake_engine.model import build_cuda_double

    try:
        return build_cuda_double()
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"the CUDA driver double cannot be built here: {e}")


@pytest.fixture
def sidecar():
    if sidecar_bin() is None:
        pytest.skip(NOT_BUILT)
    s = SidecarProcess()
    yield s
    s.stop()
