"""Backend ``triton``: the re-associated layer (``afkern.ops.layer``) with the Triton kernels of
``kernels/`` (installed as ``afkern.kernels``): the fused core (scores, softmax, mix), the row op
and the residual-add LayerNorm; the d x d query/key/value GEMMs of training stay on cuBLAS.
"""

from __future__ import annotations

import os

import torch

from ..ops.layer import Primitives, folded_call, fusion_layer
from ..ops.limits import MAX_INDEX

__all__ = ["primitives", "layer", "bind", "status"]


def status(device: torch.device):
    try:
        from .. import kernels  # noqa: F401
        from ..kernels import fusion_core  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return False, f"the Triton kernels could not be imported ({type(exc).__name__}: {exc}); `pip install triton`"
    if device.type == "cuda":
        return True, "ok"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "ok (TRITON_INTERPRET=1: the Triton interpreter on CPU, slow, for tests)"
    return False, (
        f"the triton backend runs on CUDA tensors; these are on {device.type} "
        "(set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter on CPU)"
    )


_PRIMS = None


def primitives() -> Primitives:
    global _PRIMS
    if _PRIMS is None:
        from ..kernels.add_norm import add_layer_norm_triton
        from ..kernels.fusion_core import fusion_core_triton
        from ..kernels.rowop import rowop_triton
        from ..kernels.segmented import seg_mm_triton

        # a routed batch: the fused core serves it, unfolded (training: the d x d maps are segmented
        # GEMMs, ONE launch each over the route-sorted tokens) and folded (inference: the core
        # reads each segment's folded maps in place, routed_core)
        _PRIMS = Primitives(rowop=rowop_triton, add_norm=add_layer_norm_triton, core=fusion_core_triton,
                            seg_mm=seg_mm_triton, routed_core=True, uniform_dtype=True)
    return _PRIMS


def layer(h, input_tensor, P, spec, inv_temperature=1.0, score_scale=None, folded=None, prior=None, plan=None):
    """h, input_tensor [T, d] on CUDA (or CPU under TRITON_INTERPRET=1), float32 / bfloat16 / float16."""
    _check(h, P)
    return fusion_layer(h.contiguous(), input_tensor.contiguous(), P, spec, primitives(), inv_temperature,
                        score_scale, folded, prior, plan)


def bind(P, spec, plan, h):
    """``layer`` of ``plan`` with its decisions made, for activations like ``h`` (the per-call
    checks and contiguous inputs stay per call), or None (the plan is not one folded fusion)."""
    _check(h, P)
    call = folded_call(P, spec, primitives(), plan, h.dtype)
    if call is None:
        return None

    def run(h, input_tensor):
        _check(h, P)
        return call(h.contiguous(), input_tensor.contiguous())

    return run


def _check(h, P):
    from ..kernels.common import INTERPRET

    if h.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"triton backend: tensors are on {h.device}; it runs on CUDA, or on CPU only with "
                           "TRITON_INTERPRET=1 set before triton is imported")
    N, r, d = P.down_weight.shape
    if h.shape[0] * max(d, 2 * N * r) > MAX_INDEX:
        raise ValueError(f"triton backend: {h.shape[0]} tokens x width {max(d, 2 * N * r)} exceeds the kernels' int32 "
                         "indexing (2**31 elements per tensor); split the batch")
