"""The one dispatch point for afkern's backends.

=============  ==============================================================  ===============
name           what runs                                                       where
=============  ==============================================================  ===============
reference      naive per-adapter AdapterFusion (the oracle)                     any device
torch          re-associated algebra in torch ops, folded at inference          any device
triton         Triton kernels (fused GEMM prologues/epilogues, row op, LN)      CUDA; CPU only
                                                                               under TRITON_INTERPRET=1
cuda           torch GEMMs (cuBLAS) + afkern's CUDA row-op / add-LN ops         CUDA, with the
                                                                               built extension
auto           the fastest measured backend that can run on the device         any device
=============  ==============================================================  ===============

A backend asked for by name that cannot run raises RuntimeError saying why and how to get it;
``auto`` falls back quietly, and :func:`resolve_backend` tells what it chose.
"""

from __future__ import annotations

import os
from typing import Callable, List, Tuple

import torch

from .activations import KERNEL_ACTIVATIONS, canonical_activation

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "backend_status", "get_layer_fn"]

BACKENDS = ("reference", "torch", "triton", "cuda", "auto")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
    return name


def _triton_status(device: torch.device) -> Tuple[bool, str]:
    try:
        import importlib

        importlib.import_module("afkern.kernels.fusion")
    except Exception as exc:  # pragma: no cover - depends on the install
        return False, f"Triton kernels could not be imported ({exc}); `pip install triton`"
    if device.type == "cuda":
        return True, "ok"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "ok (TRITON_INTERPRET=1: the Triton interpreter on CPU, slow, for tests)"
    return False, (
        f"the triton backend runs on CUDA tensors; these are on {device.type} "
        "(set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter on CPU)"
    )


def _cuda_status(device: torch.device) -> Tuple[bool, str]:
    if device.type != "cuda":
        return False, (
            f"the cuda backend runs on CUDA tensors; these are on {device.type} (it needs a CUDA GPU and the "
            "extension built at install: AFKERN_FORCE_CUDA_BUILD=1 pip install --no-build-isolation .)"
        )
    from . import _cuda

    ok, why = _cuda.extension_status()
    return ok, why


def backend_status(name: str, device="cpu") -> Tuple[bool, str]:
    """(can_run, reason) for a backend name on a device."""
    name = _check_name(name)
    device = torch.device(device)
    if name in ("reference", "torch", "auto"):
        return True, "ok"
    if name == "triton":
        return _triton_status(device)
    return _cuda_status(device)


def available_backends(device=None) -> List[str]:
    """Backend names that can run on ``device`` (default: CUDA if present, else CPU), ``auto`` last."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [n for n in BACKENDS if backend_status(n, device)[0]]


MAX_KERNEL_ADAPTERS = 64  # the Triton and CUDA kernels hold one token's N scores in registers


def _kernel_ok(spec) -> bool:
    return canonical_activation(spec.activation) in KERNEL_ACTIVATIONS and spec.n_adapters <= MAX_KERNEL_ADAPTERS


# The order in which ``auto`` tries backends on a CUDA device. The kernel backends enter it only
# once a GPU benchmark (afkern-bench on a GPU, committed under benchmarks/results/<gpu>/) shows
# they win there; until then ``auto`` keeps the cuBLAS-backed torch path, which needs no kernel
# that has not run on a GPU. AFKERN_AUTO_GPU="triton,cuda,torch" opts in earlier.
AUTO_GPU_ORDER = ("torch",)


def _auto_gpu_order() -> Tuple[str, ...]:
    env = os.environ.get("AFKERN_AUTO_GPU")
    if not env:
        return AUTO_GPU_ORDER
    order = tuple(x.strip() for x in env.split(",") if x.strip())
    bad = [x for x in order if x not in ("torch", "triton", "cuda")]
    if bad:
        raise ValueError(f"AFKERN_AUTO_GPU lists unknown backends {bad}; expected names from torch, triton, cuda")
    return order


def resolve_backend(name: str, device, spec=None) -> str:
    """The concrete backend that ``name`` means for tensors on ``device`` and a block ``spec``.

    ``auto``: on CPU, torch (the re-associated path is the fastest there); on CUDA, the first
    backend of :data:`AUTO_GPU_ORDER` (or ``AFKERN_AUTO_GPU``) that can run and has the block's
    activation, else torch. The reference path is never chosen automatically.
    """
    name = _check_name(name)
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            for cand in _auto_gpu_order():
                if cand == "torch":
                    return "torch"
                if backend_status(cand, device)[0] and (spec is None or _kernel_ok(spec)):
                    return cand
        return "torch"
    ok, why = backend_status(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} cannot run here: {why}")
    if name in ("triton", "cuda") and spec is not None and not _kernel_ok(spec):
        if spec.n_adapters > MAX_KERNEL_ADAPTERS:
            raise ValueError(
                f"backend {name!r} fuses at most {MAX_KERNEL_ADAPTERS} adapters per block, this block has "
                f"{spec.n_adapters}; use backend='torch'"
            )
        raise ValueError(
            f"backend {name!r} has no kernel for activation {spec.activation!r}; kernels support "
            f"{sorted(KERNEL_ACTIVATIONS)}; use backend='torch'"
        )
    return name


def get_layer_fn(name: str) -> Callable:
    """The layer function of a concrete backend: ``fn(h, input_tensor, P, spec, inv_temperature,
    score_scale, folded) -> (out [T, d], probs [T, N] or None)`` on 2-D inputs."""
    if name == "reference":
        from .ops.reference import fusion_layer_reference

        return lambda h, x, P, spec, it, ss, folded=None: fusion_layer_reference(h, x, P, spec, it, ss)
    if name == "torch":
        from .ops.fusion import fusion_layer_torch

        return fusion_layer_torch
    if name == "triton":
        from .kernels.fusion import fusion_layer_triton

        return fusion_layer_triton
    if name == "cuda":
        from ._cuda import fusion_layer_cuda

        return fusion_layer_cuda
    raise ValueError(f"no layer function for backend {name!r}")
