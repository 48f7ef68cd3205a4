"""Compiling afkern's C++ / CUDA sources at first use from a source checkout (``AFKERN_JIT_BUILD=1``):
the fallback when an extension was not built at install, and how the mutation runner builds a
mutated csrc/ (``scripts/mutants/run.py``). The sources and flags come from ``csrc_build.py``
beside setup.py, so the JIT build compiles what setup.py does."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

__all__ = ["enabled", "repo_root", "csrc_build", "load", "own_build"]


def enabled() -> bool:
    """Whether ``AFKERN_JIT_BUILD=1`` asks for a JIT build of an extension that does not import."""
    return os.environ.get("AFKERN_JIT_BUILD", "").strip() == "1"


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def csrc_build() -> ModuleType:
    """``csrc_build.py`` of the checkout afkern runs from (raises outside a source checkout)."""
    root = repo_root()
    build_py = os.path.join(root, "csrc_build.py")
    if not (os.path.exists(build_py) and os.path.isdir(os.path.join(root, "csrc"))):
        raise RuntimeError(f"AFKERN_JIT_BUILD=1 needs a source checkout (csrc/ and csrc_build.py in {root})")
    spec = importlib.util.spec_from_file_location("afkern_csrc_build", build_py)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(name: str, **kwargs):
    """``torch.utils.cpp_extension.load(name, **kwargs)`` (it rebuilds when the sources changed)."""
    from torch.utils.cpp_extension import load as _load

    return _load(name=name, verbose=os.environ.get("AFKERN_JIT_VERBOSE") == "1", **kwargs)


def own_build(module: ModuleType) -> ModuleType:
    """``module`` (an imported extension) if it lies in the afkern package that imports it; an
    editable install maps ``afkern._cpu`` to its own checkout, so a copy of the tree (the mutation
    runner's) would load that checkout's build in place of its own sources: ImportError then."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or ""))
    if where != pkg:
        raise ImportError(f"{module.__name__} resolves to {where}, not to this afkern package ({pkg})")
    return module
