"""What the fused kernels (Triton ``kernels/`` and CUDA ``csrc/``) can take: the one Python source
of every kernel limit. ``tests/test_limits.py`` checks that the constants written in ``csrc/``
agree with these, and the backend registry (``afkern.backends``) reads them from here.
"""

from __future__ import annotations

from typing import Dict

import torch

__all__ = ["MAX_ADAPTERS", "KERNEL_DTYPES", "KERNEL_ACTIVATIONS", "MAX_INDEX", "MAX_LN_WIDTH"]

#: Largest adapter count of one fused block in the kernels: one token's N scores live in
#: registers (Triton) or in warp 0, two adapters per lane (CUDA).
MAX_ADAPTERS = 64

#: Storage dtypes the kernels are compiled for (math is float32 whatever the storage).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Kernels index with int32 offsets: at most this many elements per tensor.
MAX_INDEX = 2**31 - 1

#: Widest row the CUDA residual-add LayerNorm takes (its backward keeps 2 d float32 partials in
#: shared memory).
MAX_LN_WIDTH = 16384

#: Integer codes of the activations the kernels implement (``afkern.activations`` has the torch
#: functions; the Triton ``_act`` and the CUDA ``act_fwd`` switch on these codes).
KERNEL_ACTIVATIONS: Dict[str, int] = {
    "linear": 0,
    "relu": 1,
    "gelu": 2,
    "gelu_tanh": 3,
    "silu": 4,
    "tanh": 5,
    "sigmoid": 6,
    "leakyrelu": 7,
    "quick_gelu": 8,
}
