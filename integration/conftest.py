"""Integration tests: the real shim, the real sidecar process, real torch tensors, the fake engine."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fake_engine.engine import ensure_import_paths  # noqa: E402
from fake_engine.sidecar import NOT_BUILT, SidecarProcess, sidecar_bin  # noqa: E402

ensure_import_paths()

import pytest  # noqa: E402


@pytest.fixture
def sidecar():
    if sidecar_bin() is None:
        pytest.skip(NOT_BUILT)
    s = SidecarProcess()
    yield s
    s.stop()
