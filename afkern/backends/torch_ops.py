"""Backend ``torch``: the re-associated layer (``afkern.ops.layer``) in torch ops, on any device.

GEMMs run on the device's BLAS (MKL / cuBLAS); the row op is ``afkern.ops.rowop.rowop_torch``
(autograd derives its backward); the add and the LayerNorm are separate torch ops, so the prologue's
``h + input`` is reused by the epilogue. At inference on CPU, one fusion's folded core (the [Z | A |
sb] GEMM, the row op, the output GEMMs) is one call of the CPU extension ``afkern._cpu`` where it is
built (:func:`cpu_inference_core`): a decoding step's single token otherwise pays a dozen torch
calls, each costing more than its arithmetic.
"""

from __future__ import annotations

import importlib
from typing import Callable, Tuple

import torch

from . import jit
from ..ops.layer import Primitives, folded_call, fusion_layer
from ..ops.limits import KERNEL_ACTIVATIONS
from ..ops.prologue import add_layer_norm_torch, layer_norm_torch
from ..ops.rowop import rowop_torch
from ..ops.segments import seg_mm_torch

__all__ = ["PRIMITIVES", "layer", "bind", "status", "cpu_extension_status", "cpu_inference_core"]

_CPU = None  # (module or None, why not)


def cpu_extension_status() -> Tuple[bool, str]:
    """(loaded, reason) of the CPU extension ``afkern._cpu`` (csrc/cpu/, built at install where a
    C++ compiler is found: setup.py). Tries to import it once."""
    global _CPU
    if _CPU is None:
        _CPU = _load_cpu()
    return _CPU[0] is not None, _CPU[1]


def _load_cpu():
    try:
        # (by name: an extension module, which imports nothing of afkern's)
        return jit.own_build(importlib.import_module(f"{__package__.rpartition('.')[0]}._cpu")), "ok"
    except Exception as exc:  # not built, or built against another torch
        err = f"{type(exc).__name__}: {exc}"
    if jit.enabled():
        try:
            root = jit.repo_root()
            build = jit.csrc_build()
            return jit.load("afkern_cpu", sources=build.cpu_sources(root), extra_cflags=build.cxx_flags()), "ok (JIT build)"
        except Exception as exc:
            err += f"; the JIT build failed ({type(exc).__name__}: {exc})"
    return None, (f"the CPU extension afkern._cpu is not built or does not load ({err}); reinstall afkern with a C++ "
                  "compiler present (pip install --no-build-isolation -e .) or set AFKERN_JIT_BUILD=1 to compile it "
                  "at first use from a source checkout; the torch row op runs meanwhile")


def cpu_inference_core(dtype: torch.dtype, device: torch.device, activation: str, fallback: Callable):
    """The folded core of an inference forward in one call of ``afkern._cpu`` (csrc/cpu/
    folded_core.cpp): CPU, float32 / float64, the kernels' activations; None elsewhere or without
    the extension. A call it does not take (autocast on, tokens or base in another dtype, weights
    that are not one folded [Z | A | sb] map, or anything that must see each torch op: a tracer
    (``torch.jit.trace``, the TorchScript ONNX exporter, which would record the opaque call's
    result as a constant), a torch function or dispatch mode, a tensor subclass) runs ``fallback``."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64) or activation not in KERNEL_ACTIVATIONS:
        return None
    if not cpu_extension_status()[0]:
        return None
    op, code = _CPU[0].folded_core, KERNEL_ACTIVATIONS[activation]

    def core(x, q, W, shared, residual, score_scale, prior, N, r, act, inv_temperature):
        if (W.w_in is None or shared is not None or score_scale is not None or x.dtype != dtype
                or W.w_in.dtype != dtype or (residual is not None and residual.dtype != dtype)
                or torch.is_autocast_enabled("cpu") or not _plain_eager(x)):
            return fallback(x, q, W, shared, residual, score_scale, prior, N, r, act, inv_temperature)
        return op(x, W.w_in, W.b_in, W.Wu, W.bu, residual, prior, N, r, code, inv_temperature)

    return core


def _plain_eager(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` is plain eager execution: a plain tensor, no tracer, no torch
    function or dispatch mode (each of them sees torch ops, not an extension's call)."""
    return (type(x) is torch.Tensor and not torch.jit.is_tracing() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0)


#: segmented GEMMs of a routed batch: a loop of torch GEMMs over the segments; at inference on
#: CPU the folded core runs in one call of the CPU extension where it is built
PRIMITIVES = Primitives(rowop=rowop_torch, add_norm=add_layer_norm_torch, norm=layer_norm_torch, seg_mm=seg_mm_torch,
                        inference_core=cpu_inference_core)


def status(device):
    return True, "ok"


def layer(h, input_tensor, P, spec, inv_temperature=1.0, score_scale=None, folded=None, prior=None, plan=None):
    return fusion_layer(h, input_tensor, P, spec, PRIMITIVES, inv_temperature, score_scale, folded, prior, plan)


def bind(P, spec, plan, h):
    """``layer`` of ``plan`` with its decisions made, for activations like ``h``: a
    :class:`afkern.ops.layer.FoldedCall`, or None (the plan is not one folded fusion)."""
    return folded_call(P, spec, PRIMITIVES, plan, h.dtype)
