"""Build script for afkern.

The pure-Python package always installs (no GPU or CUDA toolkit needed). ``kernels/`` installs
as ``afkern.kernels``. The CUDA extension ``afkern._C`` (csrc/) is built only when a CUDA
toolkit and a CUDA build of torch are both present at build time; ``AFKERN_SKIP_CUDA_BUILD=1``
never builds it, ``AFKERN_FORCE_CUDA_BUILD=1`` builds it (and fails loudly) even with no GPU.
"""

import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_extensions():
    """(ext_modules, cmdclass) for afkern._C, or ([], {}) where it cannot or must not be built."""
    if _truthy("AFKERN_SKIP_CUDA_BUILD"):
        return [], {}
    force = _truthy("AFKERN_FORCE_CUDA_BUILD")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing at build time (isolated build without torch)
        if force:
            raise RuntimeError(f"AFKERN_FORCE_CUDA_BUILD=1 but torch cannot be imported: {exc}")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if force:
            raise RuntimeError(
                f"AFKERN_FORCE_CUDA_BUILD=1 but torch.version.cuda={torch.version.cuda} and CUDA_HOME={CUDA_HOME}; "
                "install a CUDA build of torch and point CUDA_HOME at the toolkit"
            )
        return [], {}
    from csrc_build import extension_kwargs  # noqa: E402  (kept beside setup.py)

    ext = CUDAExtension(name="afkern._C", **extension_kwargs(ROOT))
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
