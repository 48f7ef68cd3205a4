"""Activation functions of the adapter bottleneck, by AdapterHub's names.

AdapterHub resolves ``non_linearity`` through ``transformers.activations.get_activation``
(plus its own ``"leakyrelu"``).  The torch paths call the same functions written here in
plain torch, so afkern does not depend on a transformers version for them.  The fused
kernels (Triton, CUDA) implement the subset in :data:`KERNEL_ACTIVATIONS` and identify
each one by a small integer code (the table lives in ``afkern.ops.limits``).
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .limits import KERNEL_ACTIVATIONS

__all__ = [
    "ACTIVATIONS",
    "KERNEL_ACTIVATIONS",
    "activation_fn",
    "activation_code",
    "activation_grad",
    "canonical_activation",
]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.01)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# canonical name -> torch function
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": _leaky_relu,
    "linear": _identity,
    "quick_gelu": _quick_gelu,
    "relu6": F.relu6,
    "mish": F.mish,
}

# AdapterHub / transformers spellings -> canonical name
_ALIASES = {
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_python": "gelu",
    "leaky_relu": "leakyrelu",
    "identity": "linear",
    "none": "linear",
}



def canonical_activation(name) -> str:
    """Return afkern's canonical name for an AdapterHub ``non_linearity`` string.

    Raises ValueError naming the accepted spellings when ``name`` is unknown.
    """
    if name is None:
        return "linear"
    if not isinstance(name, str):
        raise TypeError(f"non_linearity must be a string such as 'relu', got {type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        known = sorted(set(ACTIVATIONS) | set(_ALIASES))
        raise ValueError(f"unknown non_linearity {name!r}; expected one of {known}")
    return key


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function for an activation name (any accepted spelling)."""
    return ACTIVATIONS[canonical_activation(name)]


def activation_code(name: str) -> int:
    """Kernel code of an activation; ValueError if the fused kernels lack it."""
    key = canonical_activation(name)
    if key not in KERNEL_ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} has no fused-kernel implementation; kernels support "
            f"{sorted(KERNEL_ACTIVATIONS)} (use backend='torch' for {name!r})"
        )
    return KERNEL_ACTIVATIONS[key]


def activation_grad(name: str, z: torch.Tensor) -> torch.Tensor:
    """d act(z) / dz in closed form (float math): the oracle for kernel backward tests."""
    key = canonical_activation(name)
    if key == "linear":
        return torch.ones_like(z)
    if key == "relu":
        return (z > 0).to(z.dtype)
    if key == "leakyrelu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, 0.01))
    if key == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if key == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf
    if key == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
        t = torch.tanh(u)
        du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    if key == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if key == "tanh":
        t = torch.tanh(z)
        return 1.0 - t * t
    if key == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1.0 - s)
    if key == "quick_gelu":
        s = torch.sigmoid(1.702 * z)
        return s + 1.702 * z * s * (1.0 - s)
    # mish and anything else: autograd
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(ACTIVATIONS[key](zz).sum(), zz)
    return g
