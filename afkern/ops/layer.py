"""The re-associated AdapterFusion layer: the one statement of it that the torch, Triton and CUDA
backends share (docs/DESIGN.md section 2).

With G_n = act(x Wd_n^T + bd_n) and up_n = G_n Wu_n + bu_n (Wu_n = ``up_weight[n]``, [r, d]):

    score_n = (x Wq^T + bq) . (up_n Wk^T + bk)
            = q' . up_n + (q' . bk)          q' = (x Wq^T + bq) Wk, the bk term is equal for all n
            = (q' Wu_n^T) . G_n + q' . bu_n
    sum_n p_n up_n Wv^T = ([p_1 G_1 | ... | p_N G_N] @ Wu_cat + p @ bu) Wv^T

so the N-wide part of a layer (the *core*) is, in canonical layouts,

    Z  = x @ Wd + bd          [T, N r]     Wd [d, N r]
    A  = q @ Wa (+ ba)        [T, N r]     Wa [d, N r]   (q = q', Wa = Wu_cat^T unfolded)
    sb = q @ Ws (+ bs)        [T, N]       Ws [d, N]     (Ws = bu^T unfolded)
    Y, p = rowop(Z, A, sb)                               (afkern.ops.rowop)
    mix = Y @ Wu + p @ bu (+ res)                        Wu [N r, d], bu [N, d]

around which sit the prologue / epilogue (``afkern.ops.prologue``) and, unfolded, the d x d query,
key and value GEMMs. At inference (``folded``, ``afkern.ops.fold``) the d x d products are folded
into Wd/Wa/Ws and Wu/bu, and [Z | A | sb] is one GEMM when q is x.

A backend is a :class:`Primitives`: its row op, its add + LayerNorm, optionally its separate norm
(then the prologue forms h + input and the epilogue reuses it), and optionally a fused ``core``
that does the three GEMMs, the row op and the mix in kernels (Triton). Without a core the layer
runs the GEMMs in torch (cuBLAS / MKL) around ``rowop``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..activations import activation_fn
from .fold import FoldedWeights
from .params import FusionParams, LayerSpec
from .prologue import add_norm, norm_only, prologue

__all__ = ["Primitives", "CoreWeights", "fusion_layer", "gemm_core", "shared_score", "single_adapter_output"]


@dataclass
class CoreWeights:
    """The core's weights in canonical layouts (possibly strided views; see the module docstring).

    ``w_in`` / ``b_in``: when q is x and Wd, Wa, Ws are column blocks of one folded matrix, that
    matrix and its bias, so a GEMM-based core computes [Z | A | sb] in one GEMM.
    """

    Wd: torch.Tensor
    bd: torch.Tensor
    Wa: torch.Tensor
    ba: Optional[torch.Tensor]
    Ws: torch.Tensor
    bs: Optional[torch.Tensor]
    Wu: torch.Tensor
    bu: torch.Tensor
    w_in: Optional[torch.Tensor] = None
    b_in: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Primitives:
    """What a backend brings to :func:`fusion_layer`.

    - ``rowop(Z, A, sb, n_adapters, activation, inv_temperature, score_scale, prior) -> (Y, p)``;
    - ``add_norm(x, residual, weight, bias, eps) -> LayerNorm(x + residual)`` (residual may be None),
      in ``torch.promote_types(x.dtype, residual.dtype)`` as torch's add would give: under autocast
      a 16-bit ``x`` and the float32 residual stream give a float32 result, as in the plain model;
    - ``norm(u, weight, bias, eps)`` or None: a separate LayerNorm (the prologue then forms
      ``h + input`` itself and the epilogue reuses it, saving an add);
    - ``core(x, q, W, shared, residual, score_scale, prior, N, r, activation, inv_temperature) ->
      (mix, p)`` or None: the fused N-wide core (else GEMMs in torch around ``rowop``);
    - ``uniform_dtype``: the kernels compute in one dtype, so the adapter and fusion parameters
      are cast to the activations' (h's) dtype first (autocast, mixed-precision weights). The
      residual stream (``input_tensor``) and the LayerNorm's weights keep theirs: ``add_norm``
      and the core's residual epilogue load each input in its own dtype.

    All must be differentiable (autograd Functions) when gradients are needed.
    """

    rowop: Callable
    add_norm: Callable
    norm: Optional[Callable] = None
    core: Optional[Callable] = None
    uniform_dtype: bool = False


def shared_score(query, qp, residual, P: FusionParams, spec: LayerSpec) -> torch.Tensor:
    """[T] score term shared by all adapters: ``q . bk`` (+ ``q' . residual`` under residual_before).
    It cancels in the softmax except under score dropout, which scales each adapter's full score."""
    c = torch.zeros_like(qp[:, 0])
    if spec.key:
        q = F.linear(query, P.query_weight, P.query_bias) if spec.query else query
        c = c + q @ P.key_bias
    if spec.residual_before:
        c = c + (qp * residual).sum(-1)
    return c


def single_adapter_output(x: torch.Tensor, residual: torch.Tensor, P: FusionParams, spec: LayerSpec) -> torch.Tensor:
    """One active adapter without fusion (``Adapter.forward``): ``dropout(up) + residual``."""
    n = spec.active
    up = F.linear(activation_fn(spec.activation)(F.linear(x, P.down_weight[n], P.down_bias[n])),
                  P.up_weight[n].t(), P.up_bias[n])
    if spec.adapter_dropout > 0:
        up = F.dropout(up, spec.adapter_dropout, training=True)
    return up + residual


def gemm_core(rowop: Callable) -> Callable:
    """A core from torch GEMMs around a backend's row op (torch and CUDA backends)."""

    def core(x, q, W: CoreWeights, shared, residual, score_scale, prior, N, r, activation, inv_temperature):
        NR = N * r
        if W.w_in is not None:
            zab = torch.addmm(W.b_in, x, W.w_in)
            Z, A, sb = zab[:, :NR], zab[:, NR:2 * NR], zab[:, 2 * NR:]
        else:
            Z = torch.addmm(W.bd, x, W.Wd)
            A = q @ W.Wa if W.ba is None else torch.addmm(W.ba, q, W.Wa)
            sb = q @ W.Ws if W.bs is None else torch.addmm(W.bs, q, W.Ws)
        if shared is not None:
            sb = sb + shared.unsqueeze(-1)
        Y, p = rowop(Z, A, sb, N, activation, inv_temperature, score_scale, prior)
        # a residual wider than the GEMM (the float32 stream under autocast) is added after it,
        # in its own dtype: folding it into addmm would round the stream to 16 bits
        wide = residual if residual is not None and residual.dtype != Y.dtype else None
        mix = torch.mm(Y, W.Wu) if residual is None or wide is not None else torch.addmm(residual, Y, W.Wu)
        # p is float32 (float64 for float64); [N, d] bias rows: cast so in-place addmm is autocast-safe
        mix = mix.addmm_(p.to(mix.dtype), W.bu.to(mix.dtype))
        return (mix if wide is None else wide + mix), p

    return core


def _core_weights(P: FusionParams, spec: LayerSpec, folded: Optional[FoldedWeights]) -> CoreWeights:
    N, r, d = P.down_weight.shape
    NR = N * r
    if folded is None:
        Wd_cat, Wu_cat = P.down_weight.reshape(NR, d), P.up_weight.reshape(NR, d)
        return CoreWeights(Wd_cat.t(), P.down_bias.reshape(NR), Wu_cat.t(), None, P.up_bias.t(), None,
                           Wu_cat, P.up_bias)
    w_out = folded.w_out
    if folded.w_q is None:
        w_in, b_in = folded.w_in, folded.b_in
        return CoreWeights(w_in[:, :NR], b_in[:NR], w_in[:, NR:2 * NR], b_in[NR:2 * NR], w_in[:, 2 * NR:],
                           b_in[2 * NR:], w_out[:NR], w_out[NR:], w_in=w_in, b_in=b_in)
    w_q, b_q = folded.w_q, folded.b_q
    return CoreWeights(folded.w_in, folded.b_in, w_q[:, :NR], b_q[:NR], w_q[:, NR:], b_q[NR:], w_out[:NR], w_out[NR:])


def _cast_folded(folded: Optional[FoldedWeights], dtype) -> Optional[FoldedWeights]:
    if folded is None or folded.w_in.dtype == dtype:
        return folded
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return FoldedWeights(c(folded.w_in), c(folded.b_in), c(folded.w_q), c(folded.b_q), c(folded.w_out), c(folded.w_res))


def fusion_layer(
    h: torch.Tensor,
    input_tensor: torch.Tensor,
    P: FusionParams,
    spec: LayerSpec,
    prims: Primitives,
    inv_temperature: float = 1.0,
    score_scale: Optional[torch.Tensor] = None,
    folded: Optional[FoldedWeights] = None,
    prior: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One adapter site on 2-D inputs: ``h`` [T, d] (the sub-layer output AdapterHub hands its
    adapters), ``input_tensor`` [T, d] (its ``residual_input``). Returns (out [T, d], p [T, N] in the
    accumulation dtype, or None without fusion).

    ``score_scale`` [T, N]: the score-dropout scale (0 or 1/(1-p)), drawn once by the caller and
    used forward and backward; ``prior`` [N] or [T, N]: added to the tempered scores (controls,
    routing); ``folded``: inference weights, or None to run unfolded (training).
    """
    if prims.uniform_dtype:
        # The kernels compute in h's dtype. Under autocast h is 16-bit while input_tensor, the
        # residual stream, is the float32 output of the previous LayerNorm: it is not rounded (the
        # plain model adds in float32); the add + norm primitives and the core's residual epilogue
        # read it in float32 and return float32, so the block's output is float32 as the plain
        # module's is. Only what feeds the GEMMs (x, the query) is cast to h's dtype.
        dt = h.dtype
        P = P.to(dt).replace(ln_weight=P.ln_weight, ln_bias=P.ln_bias)
        folded = _cast_folded(folded, dt)
    N, r, d = P.down_weight.shape
    x, query, residual, pre = prologue(h, input_tensor, P, spec, prims)
    if prims.uniform_dtype:
        xc = x.to(dt)
        x, query = xc, (xc if query is x else query.to(dt))

    if not spec.fusion:
        hidden = single_adapter_output(x, residual, P, spec)
        if spec.original_ln_after:
            hidden = add_norm(prims, hidden, input_tensor, P, spec)
        return hidden, None

    if score_scale is not None:
        folded = None  # the folded weights drop the score terms that dropout makes matter
    W = _core_weights(P, spec, folded)
    shared = None
    if folded is not None:
        q = x if folded.w_q is None else query
        value_map = None  # folded into W.Wu / W.bu
        res_term = residual if folded.w_res is None else residual @ folded.w_res
    else:
        q = F.linear(query, P.query_weight, P.query_bias) if spec.query else query
        if spec.key:
            q = q @ P.key_weight
        if score_scale is not None:
            shared = shared_score(query, q, residual, P, spec)
        value_map = P.value_weight if spec.value else None
        res_term = residual
    # The residual joins after the value map unless residual_before puts it under it. When it is
    # h and the prologue formed h + input, start from that sum: the epilogue's add is then free.
    reuse_pre = (pre is not None and spec.original_ln_after and spec.residual_before_ln is True
                 and not spec.residual_before)
    after = pre if reuse_pre else res_term
    core = prims.core or gemm_core(prims.rowop)
    if value_map is None:
        hidden, probs = core(x, q.contiguous(), W, shared, after, score_scale, prior, N, r, spec.activation,
                             inv_temperature)
    else:
        before = res_term if spec.residual_before else None
        mix, probs = core(x, q.contiguous(), W, shared, before, score_scale, prior, N, r, spec.activation,
                          inv_temperature)
        if spec.residual_before:
            hidden = F.linear(mix, value_map)
        elif after.dtype != mix.dtype:  # the float32 stream under autocast: add it unrounded
            hidden = after + F.linear(mix, value_map)
        else:
            hidden = torch.addmm(after, mix, value_map.t())
    if reuse_pre:
        return norm_only(prims, hidden, P, spec), probs
    if spec.original_ln_after:
        hidden = add_norm(prims, hidden, input_tensor, P, spec)
    return hidden, probs
