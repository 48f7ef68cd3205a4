"""Build script for afkern.

The pure-Python package always installs (no GPU or CUDA toolkit needed). ``kernels/`` installs
as ``afkern.kernels``. The CUDA extension ``afkern._C`` (csrc/) is built only when a CUDA
toolkit and a CUDA build of torch are both present at build time; ``AFKERN_SKIP_CUDA_BUILD=1``
never builds it, ``AFKERN_FORCE_CUDA_BUILD=1`` builds it (and fails loudly) even with no GPU.

The CPU extension ``afkern._cpu`` (csrc/cpu/: the folded fusion core of an inference forward in
one call) is built whenever torch is importable at build time (``--no-build-isolation``) and a
C++ compiler is found; it is optional: a failed build installs afkern without it (the torch row
op runs instead, and ``afkern.backends.torch_ops.cpu_extension_status()`` says why).
``AFKERN_SKIP_CPU_BUILD=1`` never builds it.
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


def cpu_extensions():
    """[afkern._cpu] (optional), or [] where it cannot or must not be built."""
    if _truthy("AFKERN_SKIP_CPU_BUILD"):
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except Exception:  # torch missing at build time (isolated build without torch)
        return []
    from csrc_build import cpu_sources, cxx_flags  # noqa: E402

    return [CppExtension(name="afkern._cpu", sources=[os.path.relpath(p, ROOT) for p in cpu_sources(ROOT)],
                         extra_compile_args=cxx_flags(), optional=True)]


def build_ext_class(base):
    """``base`` (torch's BuildExtension) where an optional extension that fails to build is left
    out with a message instead of failing the install (setuptools' ``optional`` does not catch
    the errors of torch's ninja build)."""

    class BuildExt(base):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not getattr(ext, "optional", False):
                    raise
                print(f"afkern: the optional extension {ext.name} was not built ({type(exc).__name__}: {exc}); "
                      "afkern runs without it", file=sys.stderr)

    return BuildExt


ext_modules, cmdclass = cuda_extensions()
cpu_modules = cpu_extensions()
if cpu_modules:
    from torch.utils.cpp_extension import BuildExtension  # noqa: E402

    base = cmdclass.get("build_ext", BuildExtension.with_options(use_ninja=True))
    ext_modules, cmdclass = ext_modules + cpu_modules, {**cmdclass, "build_ext": build_ext_class(base)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
