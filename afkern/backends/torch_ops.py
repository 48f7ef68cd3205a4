"""Backend ``torch``: the re-associated layer (``afkern.ops.layer``) in torch ops, on any device.

GEMMs run on the device's BLAS (MKL / cuBLAS); the row op is ``afkern.ops.rowop.rowop_torch``
(autograd derives its backward); the add and the LayerNorm are separate torch ops, so the prologue's
``h + input`` is reused by the epilogue.
"""

from __future__ import annotations

from ..ops.layer import Primitives, fusion_layer
from ..ops.prologue import add_layer_norm_torch, layer_norm_torch
from ..ops.rowop import rowop_torch
from ..ops.segments import seg_mm_torch

__all__ = ["PRIMITIVES", "layer", "status"]

#: segmented GEMMs of a routed batch: a loop of torch GEMMs over the segments
PRIMITIVES = Primitives(rowop=rowop_torch, add_norm=add_layer_norm_torch, norm=layer_norm_torch, seg_mm=seg_mm_torch)


def status(device):
    return True, "ok"


def layer(h, input_tensor, P, spec, inv_temperature=1.0, score_scale=None, folded=None, prior=None, plan=None):
    return fusion_layer(h, input_tensor, P, spec, PRIMITIVES, inv_temperature, score_scale, folded, prior, plan)
