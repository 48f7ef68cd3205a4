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
that does the three GEMMs, the row op and the mix in kernels (Triton), and its segmented GEMM.
Without a core the layer runs the GEMMs in torch (cuBLAS / MKL) around ``rowop``.

One layer, any number of segments (docs/DESIGN.md section 7): :func:`fusion_layer` takes an
optional :class:`afkern.ops.segments.SegmentPlan`. The plain forward is its one-segment case
(:func:`one_segment`); a routed batch sorts the tokens by fusion (or single adapter) and the
maps that depend on the fusion become segmented GEMMs, the N-wide work staying one GEMM (or the
backend's fused core) over every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .activations import activation_fn
from .fold import FoldedWeights
from .params import FusionParams, LayerSpec
from .prologue import add_norm, forms_sum, norm_only, prologue
from .rowop import as_dtype
from .segments import Segment, SegmentPlan, per_token, row_inputs, seg_mm, seg_mm_torch, view_offsets

__all__ = ["Primitives", "CoreWeights", "FoldedCall", "fusion_layer", "folded_call", "gemm_core", "one_segment"]


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
    #: a routed batch of folded fusions (a core with ``Primitives.routed_core``): (segment of each
    #: sorted row int32 [T], offsets int64 [S] of each segment's Wa / Ws, of its ba / bs, of its
    #: Wu / bu from segment 0's views above); None: one map for every row
    seg: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None


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
    - ``seg_mm(x, weights, rows, biases, base, accumulate)``: the segmented GEMM of a routed batch
      (``afkern.ops.segments.seg_mm_torch``'s signature; default: that one);
    - ``routed_core``: the fused core also takes per-segment folded maps (``CoreWeights.seg``), so
      a routed batch at inference runs the core over every token (else segmented GEMMs around the
      row op);
    - ``uniform_dtype``: the kernels compute in one dtype, so the adapter and fusion parameters
      are cast to the activations' (h's) dtype first (autocast, mixed-precision weights). The
      residual stream (``input_tensor``) and the LayerNorm's weights keep theirs: ``add_norm``
      and the core's residual epilogue load each input in its own dtype.
    - ``inference_core(dtype, device, activation, core) -> core or None``: a core without autograd
      for one fusion's folded maps (:class:`FoldedCall`, gradients off) in ``dtype`` on ``device``,
      which falls back to ``core`` for a call it does not take; None where it has none.

    All must be differentiable (autograd Functions) when gradients are needed.
    """

    rowop: Callable
    add_norm: Callable
    norm: Optional[Callable] = None
    core: Optional[Callable] = None
    seg_mm: Callable = seg_mm_torch
    routed_core: bool = False
    uniform_dtype: bool = False
    inference_core: Optional[Callable] = None


def gemm_core(rowop: Callable) -> Callable:
    """A core from torch GEMMs around a backend's row op (torch and CUDA backends)."""

    def core(x, q, W: CoreWeights, shared, residual, score_scale, prior, N, r, activation, inv_temperature):
        NR = N * r
        if W.w_in is not None:
            zab = torch.addmm(W.b_in, x, W.w_in)
            Z, A, sb = zab.split_with_sizes((NR, NR, zab.shape[1] - 2 * NR), 1)  # one op for three views
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
        mix = mix.addmm_(as_dtype(p, mix.dtype), as_dtype(W.bu, mix.dtype))
        return (mix if wide is None else wide + mix), p

    return core


def _unfolded_weights(P: FusionParams) -> CoreWeights:
    N, r, d = P.down_weight.shape
    Wd_cat, Wu_cat = P.down_weight.reshape(N * r, d), P.up_weight.reshape(N * r, d)
    return CoreWeights(Wd_cat.t(), P.down_bias.reshape(N * r), Wu_cat.t(), None, P.up_bias.t(), None, Wu_cat, P.up_bias)


def _folded_weights(folded: FoldedWeights, NR: int) -> CoreWeights:
    """The core's weights from one fusion's :class:`FoldedWeights` (one segment over every token),
    made once per fold (the views cost more than the GEMMs at a decoding step's single token)."""
    if folded.core is None:
        folded.core = _core_views(folded, NR)
    return folded.core


def _core_views(folded: FoldedWeights, NR: int) -> CoreWeights:
    w_out = folded.w_out
    if folded.w_q is None:
        w_in, b_in = folded.w_in, folded.b_in
        return CoreWeights(w_in[:, :NR], b_in[:NR], w_in[:, NR:2 * NR], b_in[NR:2 * NR], w_in[:, 2 * NR:],
                           b_in[2 * NR:], w_out[:NR], w_out[NR:], w_in=w_in, b_in=b_in)
    w_q, b_q = folded.w_q, folded.b_q
    return CoreWeights(folded.w_in, folded.b_in, w_q[:, :NR], b_q[:NR], w_q[:, NR:], b_q[NR:], w_out[:NR], w_out[NR:])


def _routed_core_weights(P: FusionParams, segs, plan: SegmentPlan, NR: int) -> Optional[CoreWeights]:
    """The core's weights of a routed batch of folded fusions: the block's Wd / bd, segment 0's
    folded maps and every segment's offset from them (:func:`afkern.ops.segments.view_offsets`);
    None when the folds are not views of one storage (cast copies): then segmented GEMMs run."""
    folds = [f.folded for f in segs]
    offs = [view_offsets([getattr(f, a) for f in folds]) for a in ("w_q", "b_q", "w_out")]
    if any(o is None for o in offs):
        return None
    N, r, d = P.down_weight.shape
    f0 = folds[0]
    rows = plan.rows
    return CoreWeights(P.down_weight.reshape(NR, d).t(), P.down_bias.reshape(NR), f0.w_q[:, :NR], f0.b_q[:NR],
                       f0.w_q[:, NR:], f0.b_q[NR:], f0.w_out[:NR], f0.w_out[NR:],
                       seg=(rows.row_segments(), *(rows.offset_table(o) for o in offs)))


def _routed_res_term(mm, residual: torch.Tensor, segs, dtype: torch.dtype) -> torch.Tensor:
    """The residual term of a routed batch of folded fusions: each segment's ``w_res`` map
    (``residual_before``) applied to its rows in ``dtype``, or the residual itself when none has one."""
    if any(f.folded.w_res is not None for f in segs):
        return mm(residual.to(dtype), [f.folded.w_res for f in segs])
    return residual


def _t(w: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if w is None else w.t()


def _reuse_pre(P: FusionParams, spec: LayerSpec, prims: Primitives, residual_before: bool) -> bool:
    """Whether the core starts from the prologue's ``h + input``. The residual joins after the
    value map unless ``residual_before`` puts it under it; when it is h and the prologue formed
    h + input, start from that sum: the epilogue's add is then free (its norm stays)."""
    return (forms_sum(P, spec, prims) and spec.original_ln_after and spec.residual_before_ln is True
            and not residual_before)


@dataclass(frozen=True)
class FoldedCall:
    """One fusion's folded maps over every token -- a plain forward at inference -- with every
    decision of :func:`fusion_layer` made (:func:`folded_call`): ``call(h, input_tensor) -> (out,
    p)`` runs the prologue, the core and the epilogue and nothing else. :func:`fusion_layer` runs
    that case through it, and the compile cache (``afkern.compiler``) keeps one per setup, so a
    decoding step pays for the ops and not for the decisions. Immutable: concurrent calls share it."""

    P: FusionParams
    spec: LayerSpec
    prims: Primitives
    core: Callable
    W: CoreWeights
    w_res: Optional[torch.Tensor]  # the residual's map under the value map (residual_before), or None
    query_from_h: bool  # the core's q is h (folded query, query_before_ln), else x
    reuse_pre: bool  # the prologue's h + input is the core's base; the epilogue is the norm alone
    prior: Optional[torch.Tensor]
    inv_temperature: float
    cast: Optional[torch.dtype]  # x cast to the kernels' dtype (``Primitives.uniform_dtype``), or None

    def __call__(self, h: torch.Tensor, input_tensor: torch.Tensor):
        P, spec, prims = self.P, self.spec, self.prims
        x, _, residual, pre = prologue(h, input_tensor, P, spec, prims)
        if self.cast is not None:
            x = x.to(self.cast)
        if self.reuse_pre:
            base = pre
        else:
            base = residual if self.w_res is None else residual @ self.w_res
        N, r, _ = P.down_weight.shape
        q = h if self.query_from_h else x
        hidden, probs = self.core(x, q.contiguous(), self.W, None, base, None, self.prior, N, r, spec.activation,
                                  self.inv_temperature)
        if self.reuse_pre:
            return norm_only(prims, hidden, P, spec), probs
        if spec.original_ln_after:
            return add_norm(prims, hidden, input_tensor, P, spec), probs
        return hidden, probs


def folded_call(P: FusionParams, spec: LayerSpec, prims: Primitives, plan: SegmentPlan,
                dtype: torch.dtype) -> Optional[FoldedCall]:
    """:class:`FoldedCall` of ``plan`` for activations (h) of ``dtype``, or None when the plan is
    not one fusion's folded maps over every token without a score-dropout draw (then
    :func:`fusion_layer` runs its general path)."""
    if not plan.single:
        return None
    f = plan.segments[0]
    if not f.spec.fusion or f.folded is None or f.score_scale is not None:
        return None
    cast = None
    if prims.uniform_dtype:  # the kernels compute in h's dtype (see fusion_layer)
        cast = dtype
        P = P.to(dtype).replace(ln_weight=P.ln_weight, ln_bias=P.ln_bias)
        f = f.cast(dtype)
    N, r, _ = P.down_weight.shape
    folded = f.folded
    reuse_pre = _reuse_pre(P, spec, prims, f.spec.residual_before)
    core = prims.core or gemm_core(prims.rowop)
    if prims.inference_core is not None and not torch.is_grad_enabled():
        core = prims.inference_core(dtype, P.down_weight.device, spec.activation, core) or core
    return FoldedCall(P=P, spec=spec, prims=prims, core=core,
                      W=_folded_weights(folded, N * r), w_res=folded.w_res,
                      query_from_h=folded.w_q is not None and f.spec.query_before_ln, reuse_pre=reuse_pre,
                      prior=f.prior, inv_temperature=f.inv_temperature, cast=cast)


def one_segment(P: FusionParams, spec: LayerSpec, inv_temperature: float = 1.0,
                score_scale: Optional[torch.Tensor] = None, folded: Optional[FoldedWeights] = None,
                prior: Optional[torch.Tensor] = None) -> SegmentPlan:
    """The degenerate plan of a plain forward: one segment, the setup ``spec`` with ``P``'s maps,
    over every token in batch order."""
    on = lambda flag, t: t if flag else None  # noqa: E731 - a map its config turns off is not applied
    return SegmentPlan(None, [Segment(
        index=None, spec=spec, query_weight=on(spec.query, P.query_weight), query_bias=on(spec.query, P.query_bias),
        key_weight=on(spec.key, P.key_weight), key_bias=on(spec.key, P.key_bias),
        value_weight=on(spec.value, P.value_weight), inv_temperature=inv_temperature, score_scale=score_scale,
        prior=prior, folded=folded)])


def _flag(plan: SegmentPlan, flags, device, a, b):
    """Per token: ``a`` where its segment's flag is set, else ``b`` (no op when all agree)."""
    if all(flags):
        return a
    if not any(flags):
        return b
    return torch.where(per_token(plan.rows, flags, device), a, b)


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
    plan: Optional[SegmentPlan] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One adapter site on 2-D inputs: ``h`` [T, d] (the sub-layer output AdapterHub hands its
    adapters), ``input_tensor`` [T, d] (its ``residual_input``). Returns (out [T, d], p [T, N] in the
    accumulation dtype, or None without fusion).

    Without ``plan`` every token runs the setup ``spec`` (a fusion, or the single adapter
    ``spec.active``): ``score_scale`` [T, N] is the score-dropout scale (0 or 1/(1-p)), drawn once
    by the caller and used forward and backward; ``prior`` [N] or [T, N] is added to the tempered
    scores (controls); ``folded``: inference weights, or None to run unfolded (training). That is
    the one-segment :class:`SegmentPlan` (:func:`one_segment`).

    With ``plan`` (a routed batch, ``afkern.ops.segments``) ``P`` holds the block's N adapters
    (no fusion maps), ``spec`` is the block's site (prologue, epilogue, activation; n_adapters N)
    and ``plan.segments[k]`` serves the sorted rows ``plan.rows.bounds[k]``; p is [T, N] in block
    adapter order, 0 outside each token's fusion. The keyword arguments are then unused.
    """
    if plan is None:
        plan = one_segment(P, spec, inv_temperature, score_scale, folded, prior)
    call = folded_call(P, spec, prims, plan, h.dtype)
    if call is not None:  # one fusion's folded maps over every token
        return call(h, input_tensor)
    segs = plan.segments
    if prims.uniform_dtype:
        # The kernels compute in h's dtype. Under autocast h is 16-bit while input_tensor, the
        # residual stream, is the float32 output of the previous LayerNorm: it is not rounded (the
        # plain model adds in float32); the add + norm primitives and the core's residual epilogue
        # read it in float32 and return float32, so the block's output is float32 as the plain
        # module's is. Only what feeds the GEMMs (x, the query) is cast to h's dtype.
        dt = h.dtype
        P = P.to(dt).replace(ln_weight=P.ln_weight, ln_bias=P.ln_bias)
        segs = [f.cast(dt) for f in segs]
    N, r, d = P.down_weight.shape
    NR = N * r
    device = h.device
    mm = lambda x, ws, bs=None, base=None, accumulate=False: seg_mm(prims.seg_mm, x, ws, plan, bs, base, accumulate)  # noqa: E731
    hs, xs = plan.sort(h), plan.sort(input_tensor)
    x, _, residual, pre = prologue(hs, xs, P, spec, prims)
    if prims.uniform_dtype:
        x = x.to(dt)
    fusion = [f.spec.fusion for f in segs]
    if not any(fusion):  # single adapters (``Adapter.forward``): dropout(up_a) + residual
        G = activation_fn(spec.activation)(mm(x, [P.down_weight[f.spec.active].t() for f in segs],
                                              [P.down_bias[f.spec.active] for f in segs]))
        up = mm(G, [P.up_weight[f.spec.active] for f in segs], [P.up_bias[f.spec.active] for f in segs])
        if spec.adapter_dropout > 0:
            up = F.dropout(up, spec.adapter_dropout, training=True)
        hidden = up + residual
        out = add_norm(prims, hidden, xs, P, spec) if spec.original_ln_after else hidden
        return plan.unsort(out), None
    if not all(fusion):
        raise ValueError("one layer call runs fusions or single adapters, not both")

    qin = _flag(plan, [f.spec.query_before_ln for f in segs], device, hs, x)  # the query input
    rb = [f.spec.residual_before for f in segs]
    dropout = any(f.score_scale is not None for f in segs)
    # the folded weights drop the score terms that score dropout makes matter
    fold = not dropout and all(f.folded is not None for f in segs)
    if plan.single:
        M, prior, inv_t = segs[0].score_scale, segs[0].prior, segs[0].inv_temperature
    else:  # per-token score scale (1/temperature, dropout) and prior (-inf outside the token's fusion)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        (M, prior), inv_t = row_inputs(segs, plan.rows, N, device, acc), 1.0
    reuse_pre = _reuse_pre(P, spec, prims, any(rb))
    core = prims.core or gemm_core(prims.rowop)
    if fold:  # each segment its fusion's folded maps (one fusion over every token: FoldedCall)
        W = _routed_core_weights(P, segs, plan, NR) if prims.routed_core else None
        if W is not None:  # read in place by the backend's fused core
            base = pre if reuse_pre else _routed_res_term(mm, residual, segs, x.dtype)
            hidden, probs = core(x, qin.contiguous(), W, None, base, M, prior, N, r, spec.activation, inv_t)
        else:  # segmented GEMMs around the row op
            Z = torch.addmm(P.down_bias.reshape(NR), x, P.down_weight.reshape(NR, d).t())
            AS = mm(qin, [f.folded.w_q for f in segs], [f.folded.b_q for f in segs])
            Y, probs = prims.rowop(Z, AS[:, :NR], AS[:, NR:], N, spec.activation, inv_t, M, prior)
            base = pre if reuse_pre else _routed_res_term(mm, residual, segs, Y.dtype)
            wide = base if base.dtype != Y.dtype else None  # added after, in its own dtype (see gemm_core)
            hidden = mm(probs.to(Y.dtype), [f.folded.w_out[NR:] for f in segs],
                        base=None if wide is not None else base)
            hidden = mm(Y, [f.folded.w_out[:NR] for f in segs], base=hidden, accumulate=True)
            if wide is not None:
                hidden = wide + hidden
    else:  # unfolded: per-segment d x d maps around the shared N-wide core
        q = mm(qin, [_t(f.query_weight) for f in segs], [f.query_bias for f in segs])
        qp = mm(q, [f.key_weight for f in segs])
        shared = None
        if dropout:  # the score terms equal for all adapters no longer cancel: q . bk (+ q' . residual)
            kb = [f.key_bias for f in segs]
            if any(b is not None for b in kb):
                rows = torch.stack([b if b is not None else torch.zeros_like(q[0]) for b in kb])
                shared = q @ rows[0] if plan.single else (q * rows.to(q.dtype)[plan.rows.seg_ids]).sum(-1)
            if any(rb):
                term = _flag(plan, rb, device, (qp * residual).sum(-1), torch.zeros_like(qp[:, 0]))
                shared = term if shared is None else shared + term
        before = residual if all(rb) else None
        mix, probs = core(x, qp.contiguous(), _unfolded_weights(P), shared, before, M, prior, N, r, spec.activation,
                          inv_t)
        if any(rb) and not all(rb):
            mix = _flag(plan, rb, device, mix + residual.to(mix.dtype), mix)
            base = _flag(plan, rb, device, torch.zeros_like(residual), residual)
        else:
            base = None if all(rb) else (pre if reuse_pre else residual)
        wide = base if base is not None and base.dtype != mix.dtype else None  # the float32 stream: unrounded
        hidden = mm(mix, [_t(f.value_weight) for f in segs], base=None if wide is not None else base)
        if wide is not None:
            hidden = wide + hidden
    if reuse_pre:
        out = norm_only(prims, hidden, P, spec)
    elif spec.original_ln_after:
        out = add_norm(prims, hidden, xs, P, spec)
    else:
        out = hidden
    return plan.unsort(out), plan.unsort(probs)
