"""Reference path: the naive per-adapter AdapterFusion layer, written as AdapterHub computes it.

This is the correctness oracle of afkern and the "before" of its benchmarks. It follows
``adapters`` 1.3.0 line by line (``Adapter.pre_forward``, ``BottleneckLayer.compose_fuse``,
``BertFusion.forward``, ``Adapter.post_forward``): N separate adapters, an [..., N, d]
stack of their outputs, key and value maps applied to every adapter's output.

It shares no code with the fast paths (``afkern.ops.layer`` and the kernels): only the
``reference`` backend and the tests import it, so a bug in the fast paths cannot move the oracle.
The two inputs beyond AdapterHub's are afkern's fusion controls and routing (docs/DESIGN.md
sections 5 and 7): ``prior`` is added to the tempered scores before the softmax
(``-inf`` removes an adapter; with ``inv_temperature = 0`` it fixes the weights to
``softmax(prior)``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .activations import activation_fn
from .params import FusionParams, LayerSpec

__all__ = ["fusion_layer_reference", "block_prologue", "routed_layer_reference"]


def _norm(u: torch.Tensor, P: FusionParams, spec: LayerSpec) -> torch.Tensor:
    if P.norm_module is not None:
        return P.norm_module(u)
    return F.layer_norm(u, (spec.hidden,), P.ln_weight, P.ln_bias, spec.ln_eps)


def block_prologue(h: torch.Tensor, input_tensor: torch.Tensor, P: FusionParams, spec: LayerSpec):
    """``Adapter.pre_forward``: returns (x, query, residual) where x feeds the adapters."""
    residual = h if spec.residual_before_ln is True else None
    query = h if spec.fusion and spec.query_before_ln else None
    x = h
    if spec.original_ln_before:
        x = h + input_tensor
        if spec.layer_norm:
            if spec.residual_before_ln == "post_add":
                residual = x
            x = _norm(x, P, spec)
    if not spec.residual_before_ln:
        residual = x
    if query is None:
        query = x
    return x, query, residual


def _adapter_up(x: torch.Tensor, P: FusionParams, n: int, act) -> torch.Tensor:
    down = act(F.linear(x, P.down_weight[n], P.down_bias[n]))
    return F.linear(down, P.up_weight[n].t(), P.up_bias[n])


def fusion_layer_reference(h: torch.Tensor, input_tensor: torch.Tensor, P: FusionParams, spec: LayerSpec,
                           inv_temperature: float = 1.0, score_scale: Optional[torch.Tensor] = None, folded=None,
                           prior: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Naive layer. ``h`` is the sub-layer output (BertOutput's ``dropout(dense(.))``); returns
    (output, fusion probs).

    ``score_scale`` is the score-dropout scale (0 or 1/(1-p) per token and adapter) or None;
    ``prior`` [T, N] or [N] is added to ``scores * inv_temperature`` (None: nothing);
    ``folded`` is accepted for the backends' common signature and ignored.
    """
    act = activation_fn(spec.activation)
    x, query, residual = block_prologue(h, input_tensor, P, spec)
    if not spec.fusion:
        up = _adapter_up(x, P, spec.active, act)
        if spec.adapter_dropout > 0:
            up = F.dropout(up, spec.adapter_dropout, training=True)
        hidden = up + residual
        probs = None
    else:
        ups = [_adapter_up(x, P, n, act) for n in range(spec.n_adapters)]
        value = torch.stack(ups, dim=-2)  # [..., N, d]
        if spec.residual_before:
            # AdapterHub adds in place to the tensor that is also the key.
            value = value + residual.unsqueeze(-2)
        key = value
        q = F.linear(query, P.query_weight, P.query_bias) if spec.query else query
        k = F.linear(key, P.key_weight, P.key_bias) if spec.key else key
        v = F.linear(value, P.value_weight) if spec.value else value
        scores = torch.matmul(q.unsqueeze(-2), k.transpose(-2, -1)).squeeze(-2)  # [..., N]
        if score_scale is not None:
            scores = scores * score_scale.reshape(scores.shape).to(scores.dtype)
        scores = scores * inv_temperature
        if prior is not None:
            scores = scores + prior.to(scores.dtype).expand(scores.shape)
        probs = torch.softmax(scores, dim=-1)
        hidden = torch.matmul(probs.unsqueeze(-2), v).squeeze(-2)
        if not spec.residual_before:
            hidden = hidden + residual
    if spec.original_ln_after:
        hidden = hidden + input_tensor
        if spec.layer_norm:
            hidden = _norm(hidden, P, spec)
    return hidden, probs


# ---------------------------------------------------------------------------------------------
# routed batches (afkern.ops.segments): a loop over the segments of the naive layer
# ---------------------------------------------------------------------------------------------


def routed_layer_reference(h: torch.Tensor, input_tensor: torch.Tensor, P: FusionParams, spec: LayerSpec,
                           plan) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The oracle of a routed batch (``plan``: an ``afkern.ops.segments.SegmentPlan`` with
    ``rows``): each segment's tokens gathered and run through :func:`fusion_layer_reference` alone
    (a fusion with its ``params``, a single adapter with the block's ``P``), then scattered back.
    Returns (out [T, d], p [T, N] in block adapter order, 0 outside each token's fusion; None when
    the segments are single adapters)."""
    N = P.down_weight.shape[0]
    T = h.shape[0]
    acc_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    out = h.new_zeros(T, spec.hidden)
    fused = any(f.spec.fusion for f in plan.segments)
    probs = torch.zeros(T, N, dtype=acc_dtype, device=h.device) if fused else None
    for k, f in enumerate(plan.segments):
        idx = plan.rows.token_index(k)
        hk, xk = h.index_select(0, idx), input_tensor.index_select(0, idx)
        if not f.spec.fusion:
            o, _ = fusion_layer_reference(hk, xk, P, f.spec, 1.0, None, None, None)
        else:
            o, pk = fusion_layer_reference(hk, xk, f.params, f.spec, f.inv_temperature, f.score_scale, None, f.prior)
            full = torch.zeros(idx.shape[0], N, dtype=acc_dtype, device=h.device)
            full[:, f.index if f.index is not None else slice(None)] = pk.detach().to(acc_dtype)
            probs.index_copy_(0, idx, full)
        out = out.index_copy(0, idx, o.to(out.dtype))
    return out, probs
