"""Torch fast path: the re-associated AdapterFusion layer (DESIGN.md section 2).

With G_n = act(x Wd_n^T + bd_n) and up_n = G_n Wu_n + bu_n (Wu_n = ``up_weight[n]``, [r, d]):

    score_n = (x Wq^T + bq) . (up_n Wk^T + bk)
            = q' . up_n + (q' . bk)          q' = (x Wq^T + bq) Wk, the bk term is equal for all n
            = (q' Wu_n^T) . G_n + q' . bu_n
    sum_n p_n up_n Wv^T = ([p_1 G_1 | ... | p_N G_N] @ Wu_cat + p @ bu) Wv^T

so the layer is two GEMMs over N*r columns (``x @ Wd_cat^T`` and ``q' @ Wu_cat^T``), the row op
(``afkern.ops.rowop``), one GEMM back to d (``Y @ Wu_cat``) and the d x d maps; no [T, N, d]
tensor is formed. The ``bk`` and ``residual_before`` terms of the score are the same for every
adapter and cancel in the softmax exactly.

Inference (no gradient needed by any weight): the frozen d x d products are folded once into
``FoldedWeights`` so a layer is ``[Z | A | sb] = x @ W_in + b_in``, the row op, and
``ctx = [Y | p] @ W_out + residual-term``. Training: the same algebra, unfolded, with autograd
(or a backend's custom autograd row op) giving gradients to every trainable tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..activations import activation_fn
from .params import FusionParams, LayerSpec
from .reference import block_prologue, single_adapter_output
from .rowop import acc

__all__ = [
    "FoldedWeights", "fold_weights", "fusion_layer_torch", "layer_prologue", "shared_score",
    "rowop_autograd_torch", "add_layer_norm_torch",
]

RowOpFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
AddLNFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], float], torch.Tensor]


def rowop_autograd_torch(Z, A, sb, n_adapters, activation, inv_temperature=1.0, score_scale=None):
    """The row op in differentiable torch ops (autograd derives the backward).

    Without autograd (inference) the activation and the p-scaling run in place on ``Z``'s storage,
    which the caller gives up: that saves two [T, N*r] allocations per layer.
    """
    T, W = Z.shape
    r = W // n_adapters
    inplace = not torch.is_grad_enabled()
    act = activation_fn(activation)
    if inplace and activation in _INPLACE_ACT:
        G = _INPLACE_ACT[activation](Z)
    else:
        G = act(Z)
    G3 = G.view(T, n_adapters, r)
    s = (A.unflatten(1, (n_adapters, r)) * G3).sum(-1)
    if sb is not None:
        s = s + sb
    if score_scale is not None:
        s = s * score_scale.to(s.dtype)
    p = torch.softmax(acc(s) * inv_temperature, dim=-1)
    pc = p.to(G.dtype).unsqueeze(-1)
    Y = G3.mul_(pc) if inplace else G3 * pc
    return Y.view(T, W), p


_INPLACE_ACT = {"relu": torch.relu_, "tanh": torch.tanh_, "sigmoid": torch.sigmoid_,
                "silu": lambda z: F.silu(z, inplace=True), "linear": lambda z: z}


def add_layer_norm_torch(x, residual, weight, bias, eps):
    # the normalised width from the weight: a constant under tracing even when x has dynamic axes
    width = weight.shape[0] if weight is not None else x.shape[-1]
    return F.layer_norm(x + residual, (width,), weight, bias, eps)


@dataclass
class FoldedWeights:
    """Inference weights with every frozen product precomputed.

    ``w_in`` [d, 2*N*r + N] maps the query input to [A | sb] (and, when the query input is the
    adapter input x, also to Z in front: then it is [d, 2*N*r + N] with Z first);
    ``w_out`` [N*r + N, d] maps [Y | p] to the value-mapped mix; ``w_res`` [d, d] or None maps
    the residual when ``residual_before`` puts it under the value map.
    """

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_q: Optional[torch.Tensor]  # [d, N*r + N] when the query input is not x (query_before_ln)
    b_q: Optional[torch.Tensor]
    w_out: torch.Tensor
    w_res: Optional[torch.Tensor]


def _query_pullback(P: FusionParams, spec: LayerSpec, dtype):
    """(M, c) with q' = query @ M + c; M is None for the identity."""
    M, c = None, None
    if spec.query:
        M = P.query_weight.t()
        c = P.query_bias
    if spec.key:
        M = P.key_weight if M is None else M @ P.key_weight
        c = None if c is None else c @ P.key_weight
    return M, c


@torch.no_grad()
def fold_weights(P: FusionParams, spec: LayerSpec) -> FoldedWeights:
    """Fold the frozen products for inference; computed in float64 then cast to the weight dtype."""
    dtype = P.down_weight.dtype
    N, r, d = P.down_weight.shape
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    Q = FusionParams(**{k: f64(v) for k, v in P.__dict__.items()})
    Wd = Q.down_weight.reshape(N * r, d)
    Wu = Q.up_weight.reshape(N * r, d)
    M, c = _query_pullback(Q, spec, torch.float64)
    # query side: q' @ [Wu_cat^T | bu^T]
    Wqs = torch.cat([Wu.t(), Q.up_bias.t()], dim=1)  # [d, N*r + N]
    w_q = Wqs if M is None else M @ Wqs
    b_q = torch.zeros(w_q.shape[1], dtype=torch.float64, device=w_q.device) if c is None else c @ Wqs
    # value side: [Y | p] @ [Wu_cat ; bu] (@ Wv^T)
    w_out = torch.cat([Wu, Q.up_bias], dim=0)  # [N*r + N, d]
    w_res = None
    if spec.value:
        w_out = w_out @ Q.value_weight.t()
        if spec.residual_before:
            w_res = Q.value_weight.t().contiguous()
    if spec.query_before_ln:
        w_in, b_in = Wd.t(), Q.down_bias.reshape(N * r)
        qw, qb = w_q, b_q
    else:
        w_in = torch.cat([Wd.t(), w_q], dim=1)
        b_in = torch.cat([Q.down_bias.reshape(N * r), b_q])
        qw = qb = None
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    return FoldedWeights(cast(w_in), cast(b_in), cast(qw), cast(qb), cast(w_out), cast(w_res))


def shared_score(query, qp, residual, P: FusionParams, spec: LayerSpec) -> torch.Tensor:
    """[T] score term shared by all adapters: ``q . bk`` (+ ``q' . residual`` under residual_before)."""
    c = torch.zeros_like(qp[:, 0])
    if spec.key:
        q = F.linear(query, P.query_weight, P.query_bias) if spec.query else query
        c = c + q @ P.key_bias
    if spec.residual_before:
        c = c + (qp * residual).sum(-1)
    return c


def layer_prologue(h, input_tensor, P, spec, add_ln: AddLNFn):
    """``Adapter.pre_forward`` with a backend's fused add + LayerNorm: (x, query, residual, pre);
    ``pre`` = h + input_tensor when this path formed it (the torch add_ln), else None."""
    if spec.original_ln_before and spec.residual_before_ln != "post_add":
        pre = None
        if add_ln is add_layer_norm_torch:
            pre = h + input_tensor
            x = F.layer_norm(pre, (spec.hidden,), P.ln_weight, P.ln_bias, spec.ln_eps)
        else:
            x = add_ln(h, input_tensor, P.ln_weight, P.ln_bias, spec.ln_eps)
        residual = h if spec.residual_before_ln is True else x
        query = h if spec.fusion and spec.query_before_ln else x
        return x, query, residual, pre
    return (*block_prologue(h, input_tensor, P, spec), None)


def fusion_layer_torch(
    h: torch.Tensor,
    input_tensor: torch.Tensor,
    P: FusionParams,
    spec: LayerSpec,
    inv_temperature: float = 1.0,
    score_scale: Optional[torch.Tensor] = None,
    folded: Optional[FoldedWeights] = None,
    rowop: RowOpFn = rowop_autograd_torch,
    add_ln: AddLNFn = add_layer_norm_torch,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Re-associated layer on 2-D inputs ``h``, ``input_tensor`` [T, d]. Returns (out [T, d], p [T, N]).

    ``rowop`` and ``add_ln`` let a kernel backend substitute its own fused ops; both must be
    differentiable (autograd Functions) when gradients are needed.
    """
    N, r, d = P.down_weight.shape
    x, query, residual, pre = layer_prologue(h, input_tensor, P, spec, add_ln)

    if not spec.fusion:
        hidden = single_adapter_output(x, residual, P, spec)
        probs = None
    else:
        NR = N * r
        if score_scale is not None:
            folded = None  # the folded weights drop the score terms that dropout makes matter
        if folded is not None:
            if folded.w_q is None:
                zab = torch.addmm(folded.b_in, x, folded.w_in)
                Z, A, sb = zab[:, :NR], zab[:, NR : 2 * NR], zab[:, 2 * NR :]
            else:
                Z = torch.addmm(folded.b_in, x, folded.w_in)
                ab = torch.addmm(folded.b_q, query, folded.w_q)
                A, sb = ab[:, :NR], ab[:, NR:]
        else:
            Wd = P.down_weight.reshape(NR, d)
            Wu = P.up_weight.reshape(NR, d)
            Z = F.linear(x, Wd, P.down_bias.reshape(NR))
            qp = F.linear(query, P.query_weight, P.query_bias) if spec.query else query
            if spec.key:
                qp = qp @ P.key_weight
            A = qp @ Wu.t()
            sb = qp @ P.up_bias.t()
            if score_scale is not None:
                # Score dropout multiplies each adapter's full score, so the terms that are equal
                # for every adapter (q . bk, and q' . residual under residual_before) no longer
                # cancel in the softmax: add them back.
                sb = sb + shared_score(query, qp, residual, P, spec).unsqueeze(-1)
        Y, probs = rowop(Z, A, sb, N, spec.activation, inv_temperature, score_scale)
        if folded is not None:
            # ctx = residual-term + [Y | p] @ w_out, as two accumulating GEMMs (no concat copy).
            # When the residual is h and LayerNorm follows, start from the prologue's h + input
            # instead, so the final LayerNorm needs no add of its own.
            base = residual
            if spec.residual_before and folded.w_res is not None:
                base = residual @ folded.w_res
            reuse_pre = pre is not None and spec.original_ln_after and spec.residual_before_ln is True \
                and not spec.residual_before
            hidden = torch.addmm(pre if reuse_pre else base, Y, folded.w_out[:NR])
            hidden = hidden.addmm_(probs.to(hidden.dtype), folded.w_out[NR:].to(hidden.dtype))  # [N, d]: autocast-safe
            if reuse_pre:
                return F.layer_norm(hidden, (d,), P.ln_weight, P.ln_bias, spec.ln_eps), probs
        else:
            mix = Y @ Wu + probs.to(Y.dtype) @ P.up_bias
            if spec.residual_before:
                mix = mix + residual
            hidden = F.linear(mix, P.value_weight) if spec.value else mix
            if not spec.residual_before:
                hidden = hidden + residual
    if spec.original_ln_after:
        hidden = add_ln(hidden, input_tensor, P.ln_weight, P.ln_bias, spec.ln_eps)
    return hidden, probs

