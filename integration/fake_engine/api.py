"""Which vLLM version the fake engine follows: ``FAKE_VLLM_API`` = ``v029`` (engines.md, the default) or
``newest`` (engines-drift.md sections 1-2).

The fake ``vllm`` package reads the variable when it is imported, so a process holds one version at a time.
:func:`activate` switches this process (it drops the imported fake ``vllm`` and every module that took names
from it, so that the next import sees the other surface) and sets the variable, which the engine also hands
to its worker processes explicitly."""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Optional

ENV = "FAKE_VLLM_API"
APIS = ("v029", "newest")
V029, NEWEST = APIS

# What this process was started with: the default of every engine that names no version, so that one
# test's choice does not leak into the next one.
_PROCESS_DEFAULT = os.environ.get(ENV) or V029

# Our own modules (the shim, the fake engine) are checked for names taken from vllm: only those are dropped.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_api() -> str:
    return resolve(_PROCESS_DEFAULT)


def resolve(api: Optional[str]) -> str:
    api = api or _PROCESS_DEFAULT
    if api not in APIS:
        raise ValueError(f"{ENV}={api!r}: the fake engine follows one of {APIS}")
    return api


def loaded_api() -> Optional[str]:
    """The version of the fake vllm imported in this process; None when none is (or a real vLLM is)."""
    module = sys.modules.get("vllm")
    if module is None or not getattr(module, "__version__", "").endswith("+fake"):
        return None
    return getattr(module, "FAKE_VLLM_API", V029)


def activate(api: Optional[str]) -> str:
    """Makes this process follow ``api`` (None: the process default) and returns it."""
    api = resolve(api)
    os.environ[ENV] = api
    loaded = loaded_api()
    if loaded is not None and loaded != api:
        for name in _vllm_dependents():
            sys.modules.pop(name, None)
    return api


def _vllm_dependents() -> set:
    """The fake vllm's modules and every module of this repository that holds a name taken from one of them,
    directly or through another such module (``from .._vllm_api import KVConnectorBase_V1``). Modules with no
    such name stay, so classes like ``csharp_kv.config.ConfigError`` keep their identity across a switch."""
    doomed = {name for name in sys.modules if name == "vllm" or name.startswith("vllm.")}
    ours = {name: m for name, m in list(sys.modules.items())
            if m is not None and (getattr(m, "__file__", None) or "").startswith(_REPO) and name not in doomed}
    changed = True
    while changed:
        changed = False
        for name, module in ours.items():
            if name in doomed:
                continue
            for value in list(vars(module).values()):
                if isinstance(value, ModuleType) and value.__name__.startswith(name + "."):
                    continue  # a package's own submodule: re-importing it updates the attribute
                try:
                    origin = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
                except Exception:  # noqa: BLE001 - an object with a strange __getattr__
                    continue
                if isinstance(origin, str) and origin in doomed:
                    doomed.add(name)
                    changed = True
                    break
    return doomed
