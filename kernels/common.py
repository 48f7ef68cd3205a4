"""Shared pieces of afkern's Triton kernels: the activation table, the MMA helper, device facts.

Activation codes are ``afkern.ops.limits.KERNEL_ACTIVATIONS``; ``_act`` / ``_act_grad`` are the
closed forms of ``afkern.activations.activation_fn`` / ``activation_grad`` in float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.activations import activation_code

__all__ = ["INTERPRET", "act_code", "arch", "num_sms"]

#: The kernels run in Triton's CPU interpreter (tests on a machine without a GPU).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def act_code(activation) -> int:
    """Kernel code of an activation name (an int passes through)."""
    return activation if isinstance(activation, int) else activation_code(activation)


def arch(device: torch.device) -> int:
    """sm_<arch> of a CUDA device (80 for a CPU device: the interpreter's stand-in)."""
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


@triton.jit
def tanh(x):
    # tanh through exp of a non-positive argument: no overflow, absolute error ~1 ulp of 1.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def act(z, ACT: tl.constexpr):
    """act(z) for the kernel code ACT (0 linear, 1 relu, 2 gelu(erf), 3 gelu_tanh, 4 silu, 5 tanh,
    6 sigmoid, 7 leakyrelu(0.01), 8 quick_gelu); z is float32."""
    if ACT == 0:
        return z
    elif ACT == 1:
        return tl.maximum(z, 0.0)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return 0.5 * z * (1.0 + tanh(u))
    elif ACT == 4:
        return z * tl.sigmoid(z)
    elif ACT == 5:
        return tanh(z)
    elif ACT == 6:
        return tl.sigmoid(z)
    elif ACT == 7:
        return tl.where(z > 0, z, 0.01 * z)
    else:
        return z * tl.sigmoid(1.702 * z)


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, the closed forms of afkern.activations.activation_grad."""
    if ACT == 0:
        return tl.full(z.shape, 1.0, tl.float32)
    elif ACT == 1:
        return tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = tanh(u)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    elif ACT == 4:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 5:
        t = tanh(z)
        return 1.0 - t * t
    elif ACT == 6:
        s = tl.sigmoid(z)
        return s * (1.0 - s)
    elif ACT == 7:
        return tl.where(z > 0, 1.0, 0.01)
    else:
        s = tl.sigmoid(1.702 * z)
        return s + 1.702 * z * s * (1.0 - s)


# The interpreter's tl.dot on bfloat16 operands returns garbage (seen with triton 3.9 on CPU);
# interpreting, the operands are widened to float32 first: the same exact products and float32
# accumulation as the tensor-core path. Compiled code never takes that branch.
_INTERP_DOT_F32 = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr):
    # float32 operands: full-precision products ("ieee") to match torch's default float32 matmul
    # (TF32 off); bf16/fp16 operands: tensor-core MMA with float32 accumulation.
    if _INTERP_DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
