"""Sources and flags of the CUDA extension ``afkern._C`` and the CPU extension ``afkern._cpu``
(csrc/cpu/), shared by setup.py and the JIT build (``afkern.backends.jit``).

- C++20 for host and device code: torch 2.14's headers require it (``-std=c++20``).
- SASS for sm_80 (A100) and sm_90 (H100/H200) plus compute_90 PTX, which newer GPUs JIT.
- ``AFKERN_PTXAS_VERBOSE=1`` adds ``-Xptxas=-v`` (registers, spills, shared memory per kernel).
- ``AFKERN_CUDA_ARCHS="80;90;100"`` replaces the SASS architecture list.
- When the toolkit lacks cuBLAS/cuSPARSE headers (a minimal nvcc install beside pip's CUDA
  wheels), the include folders of the ``nvidia-*`` wheels are added.
"""

import glob
import os


def sources(root: str):
    """The .cpp and .cu files of csrc/ (the CUDA extension afkern._C), sorted (absolute paths)."""
    return sorted(glob.glob(os.path.join(root, "csrc", "*.cpp")) + glob.glob(os.path.join(root, "csrc", "*.cu")))


def cpu_sources(root: str):
    """The sources of the CPU extension afkern._cpu (csrc/cpu/), sorted (absolute paths)."""
    return sorted(glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))


def cuda_archs():
    raw = os.environ.get("AFKERN_CUDA_ARCHS", "80;90")
    return [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]


def nvcc_flags():
    archs = cuda_archs()
    flags = [
        "-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
        *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs],
        f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    ]
    if os.environ.get("AFKERN_PTXAS_VERBOSE", "") == "1":
        flags.append("-Xptxas=-v")
    return flags


def cxx_flags():
    return ["-O3", "-std=c++20"]


def extra_include_dirs():
    """Include folders of pip's nvidia-* wheels, only when the toolkit has no cublas_v2.h."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:
        return []
    if CUDA_HOME and glob.glob(os.path.join(CUDA_HOME, "include", "cublas_v2.h")) + glob.glob(
        os.path.join(CUDA_HOME, "targets", "*", "include", "cublas_v2.h")
    ):
        return []
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        for base in list(getattr(nvidia, "__path__", [])):
            for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
                if os.path.exists(os.path.join(inc, "cublas_v2.h")) or os.path.exists(os.path.join(inc, "cusparse.h")):
                    dirs.append(inc)
    except Exception:
        pass
    return dirs


def extension_kwargs(root: str) -> dict:
    return dict(
        sources=[os.path.relpath(s, root) for s in sources(root)],
        include_dirs=[os.path.join(root, "csrc"), *extra_include_dirs()],
        extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
    )


def jit_load_kwargs(root: str) -> dict:
    """Arguments of ``torch.utils.cpp_extension.load`` for the same sources and flags."""
    return dict(
        sources=sources(root),
        extra_include_paths=[os.path.join(root, "csrc"), *extra_include_dirs()],
        extra_cflags=cxx_flags(),
        extra_cuda_cflags=nvcc_flags(),
    )
