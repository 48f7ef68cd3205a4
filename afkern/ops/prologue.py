"""The fast paths' prologue and epilogue: ``Adapter.pre_forward`` / ``post_forward`` around the
fused core, with a backend's add + norm primitives (docs/DESIGN.md sections 1 and 6).

``pre_forward`` (AdapterHub, ``adapters/methods/modeling.py``), for a site that hands the adapter
``(h, input_tensor, layer_norm)``:

    residual = h                          if residual_before_ln is True
    x        = norm(h + input_tensor)     if original_ln_before (a norm-free site: h + input_tensor)
             = h                          otherwise
    residual = h + input_tensor           if residual_before_ln == "post_add" (LayerNorm sites)
    residual = x                          if residual_before_ln is False
    query    = h if query_before_ln else x

``post_forward``: ``out = norm(ctx + input_tensor)`` if original_ln_after (norm-free: the add).

The oracle (``afkern.ops.reference``) writes the same steps on its own; this module is what the
torch, Triton and CUDA backends share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .params import FusionParams, LayerSpec

__all__ = ["prologue", "forms_sum", "add_norm", "norm_only", "add_layer_norm_torch", "layer_norm_torch"]


def add_layer_norm_torch(x, residual, weight, bias, eps):
    """``LayerNorm(x + residual)`` (residual may be None) in torch ops: the torch backend's add + norm."""
    u = x if residual is None else x + residual
    return layer_norm_torch(u, weight, bias, eps)


def layer_norm_torch(u, weight, bias, eps):
    # the normalised width from the weight: a constant under tracing even when u has dynamic axes
    width = weight.shape[0] if weight is not None else u.shape[-1]
    return F.layer_norm(u, (width,), weight, bias, eps)


def add_norm(prims, x: torch.Tensor, residual: torch.Tensor, P: FusionParams, spec: LayerSpec) -> torch.Tensor:
    """``norm(x + residual)`` with the site's norm: none at a norm-free site, the site's own module
    where it is not a plain LayerNorm, else the backend's fused add + LayerNorm."""
    if not spec.layer_norm:
        return x + residual
    if P.norm_module is not None:
        return P.norm_module(x + residual)
    return prims.add_norm(x, residual, P.ln_weight, P.ln_bias, spec.ln_eps)


def norm_only(prims, u: torch.Tensor, P: FusionParams, spec: LayerSpec) -> torch.Tensor:
    """The site's norm of a sum already formed (identity at a norm-free site)."""
    if not spec.layer_norm:
        return u
    if P.norm_module is not None:
        return P.norm_module(u)
    if prims.norm is not None:
        return prims.norm(u, P.ln_weight, P.ln_bias, spec.ln_eps)
    return prims.add_norm(u, None, P.ln_weight, P.ln_bias, spec.ln_eps)


def forms_sum(P: FusionParams, spec: LayerSpec, prims) -> bool:
    """Whether :func:`prologue` forms ``h + input_tensor`` itself (its ``pre``): the adapter reads
    the norm of the sum and the site is norm-free, its norm is a separate op (the site's own
    module, a backend with a separate norm) or ``residual_before_ln="post_add"`` needs the sum."""
    return spec.original_ln_before and (not spec.layer_norm or spec.residual_before_ln == "post_add"
                                        or P.norm_module is not None or prims.norm is not None)


def prologue(h: torch.Tensor, input_tensor: torch.Tensor, P: FusionParams, spec: LayerSpec, prims):
    """``Adapter.pre_forward``: returns (x, query, residual, pre).

    ``pre`` is ``h + input_tensor`` when this path formed it (norm-free sites, a backend whose add
    and norm are separate ops, ``residual_before_ln="post_add"``), else None; the layer reuses it
    as the base of the output GEMM so the epilogue needs no add of its own.
    """
    pre = None
    if not spec.original_ln_before:
        x = h
    elif forms_sum(P, spec, prims):
        pre = h + input_tensor
        x = norm_only(prims, pre, P, spec)
    else:
        x = prims.add_norm(h, input_tensor, P.ln_weight, P.ln_bias, spec.ln_eps)
    if spec.residual_before_ln is True:
        residual = h
    elif spec.residual_before_ln == "post_add":
        residual = pre
    else:
        residual = x
    query = h if spec.fusion and spec.query_before_ln else x
    return x, query, residual, pre
