"""Sources and flags of the CUDA extension, shared by setup.py and the JIT fallback."""

import glob
import os


def sources(root: str):
    return sorted(glob.glob(os.path.join(root, "csrc", "*.cpp")) + glob.glob(os.path.join(root, "csrc", "*.cu")))


def extension_kwargs(root: str) -> dict:
    return dict(
        sources=[os.path.relpath(s, root) for s in sources(root)],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc_flags()},
    )


def nvcc_flags():
    return [
        "-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    ]
