"""Integration tests: the real shim, the real sidecar process, real torch tensors, the fake engine."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fake_engine.engine import ensure_import_paths, sidecar_bin  # noqa: E402

ensure_import_paths()

import pytest  # noqa: E402


@pytest.fixture
def sidecar():
    if sidecar_bin() is None:
        pytest.skip("the sidecar is not built: run scripts/publish.sh (or set KVSIDECAR_BIN)")
    from fake_engine.engine import SidecarProcess

    s = SidecarProcess()
    yield s
    s.stop()
