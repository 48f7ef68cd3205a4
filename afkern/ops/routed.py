"""The routed layer: several fusions (or single adapters) over one adapter set in one batch, each
token through its own (docs/DESIGN.md section 7).

A block holds N adapters once; fusion k mixes a subset S_k of them with its own query, key and
value. For a batch whose tokens are routed to different fusions, with the tokens sorted by fusion
so that each fusion owns one contiguous *segment* [start_k, end_k):

    x, query, residual = prologue(h, input)             # the block's own, shared by every token
    Z       = x Wd_cat + bd                             # ONE GEMM over every token      [T, N r]
    [A|sb]  = q_k W_in,k + b_in,k                       # per segment (a segmented GEMM) [T, N r + N]
    Y, p    = rowop(Z, A, sb, M, prior)                 # ONE row op; prior -inf outside S_k
    ctx     = [Y | p] W_out,k + residual term           # per segment (a segmented GEMM) [T, d]
    out     = add_norm(ctx, input)                      # the block's own

Inference (``RoutedFold``): W_in,k = [M_k Wu_cat^T | M_k bu^T] and W_out,k = [Wu_cat ; bu] Wv_k^T
are fusion k's folded maps written over ALL N adapters of the block (a fusion over a subset gives
the others prior -inf, so p = 0 and Y = 0 there: their rows of W_out,k contribute exactly 0).
Training (unfolded): the d x d query, key and value maps are the segmented GEMMs, and the N-wide
GEMMs ``q' @ [Wu_cat^T | bu^T]`` and ``Y @ Wu_cat + p @ bu`` are shared, since unfolded they do not
depend on the fusion. Fusion k's softmax temperature (and its score-dropout scale) is a per-token
score scale M (the row-op contract, docs/DESIGN.md section 3: M multiplies s in the forward and ds
in the backward exactly like inv_temperature); its controls are its rows of the prior.

Routing one adapter per token (parallel stage-1 training) is the same with N r replaced by r and
no row op: ``up = act(x Wd_a + bd_a) Wu_a + bu_a`` as two segmented GEMMs.

A backend brings :class:`afkern.ops.layer.Primitives` (row op, add + norm) and a segmented GEMM
(:func:`seg_mm_torch`: a loop over the K segments of torch GEMMs, no copy of any [T, N r] tensor;
the triton backend's ``kernels/segmented.py``: one launch for every segment). The oracle,
``afkern.ops.reference.routed_layer_reference``, computes the same with a loop over fusions of
the naive layer.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..activations import activation_fn
from .cache import Cache
from .params import FusionParams, LayerSpec
from .prologue import add_norm, norm_only, prologue

__all__ = ["current_route", "ACTIVE_ROUTES", "strided_stack", "RoutePlan", "RoutedFold", "RoutedFusion", "routed_fusion_layer", "routed_adapter_layer",
           "seg_mm_torch", "route_plan"]


#: The routes entered by ``afkern.route`` (innermost last); each says which blocks it covers.
ACTIVE_ROUTES: contextvars.ContextVar[tuple] = contextvars.ContextVar("afkern_route", default=())


def current_route(block):
    """The innermost active route (``afkern.routing.RouteState``) that covers ``block``, or None."""
    for state in reversed(ACTIVE_ROUTES.get()):
        if state.covers(block):
            return state
    return None


# ---------------------------------------------------------------------------------------------
# the plan: tokens sorted by route, one segment per fusion (or adapter)
# ---------------------------------------------------------------------------------------------


@dataclass
class RoutePlan:
    """Where each route's tokens are once sorted.

    ``names[k]`` owns the sorted rows ``bounds[k] = (start, end)``; ``perm`` [T] (int64, on the
    device) gives the original token of each sorted row, or None when the batch is already grouped
    (then no gather happens at all); ``inv`` its inverse. ``seg_ids`` [T]: the segment of each
    sorted row."""

    names: List[str]
    bounds: List[Tuple[int, int]]
    perm: Optional[torch.Tensor]
    inv: Optional[torch.Tensor]
    seg_ids: torch.Tensor
    tokens: int
    _tables: Cache = dataclasses.field(default_factory=Cache)

    def sort(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of ``t`` [T, ...] in route order."""
        return t if self.perm is None else t.index_select(0, self.perm)

    def unsort(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of ``t`` [T, ...] (route order) back in the batch's order."""
        return t if self.inv is None else t.index_select(0, self.inv)

    def token_index(self, k: int) -> torch.Tensor:
        """The original tokens of segment k (int64 [end - start])."""
        s, e = self.bounds[k]
        if self.perm is None:
            return torch.arange(s, e, device=self.seg_ids.device)
        return self.perm[s:e]

    def block_table(self, block_t: int) -> Tuple[torch.Tensor, int]:
        """(int32 [3, n_blocks], n_blocks): for every tile of ``block_t`` sorted rows that lies
        inside one segment (segments are cut at their own ends, as MoE kernels align experts to the
        token block), its segment, first row and end row. Cached per tile size."""
        def build():
            seg, start, end = [], [], []
            for k, (s, e) in enumerate(self.bounds):
                for r0 in range(s, e, block_t):
                    seg.append(k)
                    start.append(r0)
                    end.append(min(r0 + block_t, e))
            return torch.tensor([seg, start, end], dtype=torch.int32).to(self.seg_ids.device), len(seg)

        return self._tables.get(block_t, build)

    def segment_table(self) -> torch.Tensor:
        """int32 [2, K]: start and end row of every segment (on the device), cached."""
        return self._tables.get("segments", lambda: torch.tensor(
            [[s for s, _ in self.bounds], [e for _, e in self.bounds]], dtype=torch.int32).to(self.seg_ids.device))


def route_plan(codes: Sequence[int], names: Sequence[str], seq_len: int, device) -> RoutePlan:
    """The plan of a route: ``codes[i]`` (an index into ``names``) routes rows
    ``[i * seq_len, (i + 1) * seq_len)`` (a sequence, padding included; ``seq_len`` 1: a token).
    Stable: tokens keep their order inside a segment. Built on the host, once per batch shape."""
    B = len(codes)
    order = sorted(range(B), key=lambda i: codes[i])
    present = sorted(set(codes))
    counts = {c: 0 for c in present}
    for c in codes:
        counts[c] += 1
    bounds, s = [], 0
    for c in present:
        e = s + counts[c] * seq_len
        bounds.append((s, e))
        s = e
    T = B * seq_len
    seg_rows = torch.repeat_interleave(torch.arange(len(present)), torch.tensor([counts[c] * seq_len for c in present]))
    if order == list(range(B)):
        perm = inv = None
    else:
        o = torch.tensor(order, dtype=torch.int64)
        perm = (o[:, None] * seq_len + torch.arange(seq_len)).reshape(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(T)
        perm, inv = perm.to(device), inv.to(device)
    return RoutePlan([names[c] for c in present], bounds, perm, inv, seg_rows.to(device), T)


# ---------------------------------------------------------------------------------------------
# per-fusion inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class RoutedFold:
    """One fusion's folded inference maps over all N adapters of its block:
    ``w_q`` [d, N r + N] / ``b_q`` [N r + N] map its query input to [A | sb]; ``w_out``
    [N r + N, d] maps [Y | p] to the value-mapped mix; ``w_res`` [d, d] or None maps the residual
    under ``residual_before`` (afkern.ops.fold)."""

    w_q: torch.Tensor
    b_q: torch.Tensor
    w_out: torch.Tensor
    w_res: Optional[torch.Tensor]

    def to(self, dtype) -> "RoutedFold":
        return RoutedFold(*(_cast(t, dtype) for t in (self.w_q, self.b_q, self.w_out, self.w_res)))


def _cast(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


@dataclass
class RoutedFusion:
    """Fusion k's part of a routed forward (segment k of the plan).

    ``index``: [n_k] int64, the block's adapters it mixes in its own order (None: all N in block
    order). ``spec``: its own LayerSpec (n_adapters = n_k). ``query_weight`` ... ``value_weight``:
    its maps (None when its config turns one off). ``inv_temperature``: 1 / its temperature of
    this forward (0 under a fixed-weights control). ``score_scale`` [T_k, n_k]: its score-dropout
    draw, or None. ``prior`` [n_k]: its control's log-prior, or None. ``folded``: its
    :class:`RoutedFold` (inference), or None (unfolded). ``params``: its FusionParams over its own
    adapters, for the reference backend only (None elsewhere)."""

    index: Optional[torch.Tensor]
    spec: LayerSpec
    query_weight: Optional[torch.Tensor]
    query_bias: Optional[torch.Tensor]
    key_weight: Optional[torch.Tensor]
    key_bias: Optional[torch.Tensor]
    value_weight: Optional[torch.Tensor]
    inv_temperature: float = 1.0
    score_scale: Optional[torch.Tensor] = None
    prior: Optional[torch.Tensor] = None
    folded: Optional[RoutedFold] = None
    params: Optional[FusionParams] = None

    def cast(self, dtype) -> "RoutedFusion":
        """Its maps and folded weights in ``dtype`` (differentiable casts)."""
        return dataclasses.replace(
            self, query_weight=_cast(self.query_weight, dtype), query_bias=_cast(self.query_bias, dtype),
            key_weight=_cast(self.key_weight, dtype), key_bias=_cast(self.key_bias, dtype),
            value_weight=_cast(self.value_weight, dtype), folded=None if self.folded is None else self.folded.to(dtype))


# ---------------------------------------------------------------------------------------------
# the segmented GEMM of the torch backend
# ---------------------------------------------------------------------------------------------


def seg_mm_torch(x: torch.Tensor, weights: Sequence[Optional[torch.Tensor]], plan: RoutePlan,
                 biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 base: Optional[torch.Tensor] = None, accumulate: bool = False) -> torch.Tensor:
    """``out[s:e] = base[s:e] + x[s:e] @ weights[k] + biases[k]`` for every segment k of ``plan``.

    x [T, K]; weights[k] [K, N] (any strides) or None for the identity (K == N); biases[k] [N] or
    None; base [T, N] or None; ``accumulate``: the caller gives ``base`` up, so without autograd
    the products are added into it in place. A loop over the segments (not over sequences).

    Without autograd and autocast every op writes into one output buffer: it starts as ``base``
    (or the segments' biases gathered per row, one op) and each segment's GEMM accumulates into
    its rows in place (``addmm_``, no copy); when the segments are of equal length and the weights
    one strided stack (:func:`strided_stack`) the segments are ONE batched GEMM (``baddbmm_``: a
    CPU BLAS streams K distinct weights faster batched than in K small calls); a narrow input
    (K * segments <= 256, the ``p @ bu`` part) is one GEMM with a block-diagonal input instead
    of one tiny GEMM per segment. With autograd the segments are concatenated once."""
    S = len(plan.bounds)
    biases = biases if biases is not None else [None] * S
    if S == 1:
        return _one_segment(x, weights[0], biases[0], base)
    fast = (not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            and all(w is not None and w.dtype == x.dtype for w in weights)
            and all(b is None or b.dtype == x.dtype for b in biases)
            and (base is None or (base.dtype == x.dtype and base.is_contiguous())))
    if not fast:
        parts = [_one_segment(x[s:e], w, b, None if base is None else base[s:e])
                 for (s, e), w, b in zip(plan.bounds, weights, biases)]
        return torch.cat(parts)
    T, kdim = x.shape
    n = weights[0].shape[1]
    has_b = any(b is not None for b in biases)
    gathered = None
    if has_b:
        gathered = torch.stack([b if b is not None else x.new_zeros(n) for b in biases]).index_select(0, plan.seg_ids)
    if kdim * S <= 256:  # block-diagonal: row t's input sits in the columns of its segment
        xe = x.new_zeros(T, S, kdim)
        xe[torch.arange(T, device=x.device), plan.seg_ids] = x
        W = torch.cat(list(weights), 0)
        if base is None:
            out = torch.mm(xe.view(T, S * kdim), W)
        elif accumulate:
            out = base.addmm_(xe.view(T, S * kdim), W)
        else:
            out = torch.addmm(base, xe.view(T, S * kdim), W)
        return out if gathered is None else out.add_(gathered)
    L = plan.bounds[0][1] - plan.bounds[0][0]
    W = strided_stack(weights) if L > 0 and all(e - s == L for s, e in plan.bounds) else None
    if base is not None:
        out = base if accumulate else base.clone()
        if gathered is not None:
            out.add_(gathered)
    elif gathered is not None:
        out = gathered
    else:
        out = torch.empty(T, n, dtype=x.dtype, device=x.device)
        if W is not None:
            torch.bmm(x.reshape(S, L, kdim), W, out=out.view(S, L, n))
            return out
        for (s, e), w in zip(plan.bounds, weights):
            torch.mm(x[s:e], w, out=out[s:e])
        return out
    if W is not None:
        out.view(S, L, n).baddbmm_(x.reshape(S, L, kdim), W)
        return out
    for (s, e), w in zip(plan.bounds, weights):
        if e > s:
            out[s:e].addmm_(x[s:e], w)
    return out


def strided_stack(weights: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The weights as one [S, K, N] tensor WITHOUT a copy when they are equally spaced views of one
    storage (the stacked folds of ``afkern.routing.routed_folds`` for fusions consecutive in
    the block), else None."""
    if any(w is None for w in weights):
        return None
    w0 = weights[0]
    if len(weights) == 1:
        return w0.unsqueeze(0)
    base = w0.untyped_storage().data_ptr()
    for w in weights[1:]:
        if (w.untyped_storage().data_ptr() != base or w.shape != w0.shape or w.stride() != w0.stride()
                or w.dtype != w0.dtype):
            return None
    step = weights[1].storage_offset() - w0.storage_offset()
    if step <= 0 or any(w.storage_offset() - w0.storage_offset() != i * step for i, w in enumerate(weights)):
        return None
    return w0.as_strided((len(weights), *w0.shape), (step, *w0.stride()), w0.storage_offset())


def _one_segment(x, w, b, base):
    if w is None:
        y = x
    elif base is not None:
        y = torch.addmm(base, x, w)
        base = None
    elif b is not None:
        return torch.addmm(b, x, w)
    else:
        y = x @ w
    if base is not None:
        y = y + base
    if b is not None:
        y = y + b
    return y


# ---------------------------------------------------------------------------------------------
# the routed fusion layer (torch, triton and cuda backends)
# ---------------------------------------------------------------------------------------------


def _row_inputs(fusions: Sequence[RoutedFusion], plan: RoutePlan, N: int, device, acc_dtype):
    """(score scale M [T, N] or None, prior [T, N] or None) in block adapter order and the
    accumulation dtype: M carries each fusion's 1/temperature (times its score-dropout draw), the
    prior -inf at adapters outside the token's fusion and each fusion's control log-prior."""
    T = plan.tokens
    prior = None
    if any(f.index is not None or f.prior is not None for f in fusions):
        prior = torch.full((T, N), -math.inf, dtype=acc_dtype, device=device)
        for (s, e), f in zip(plan.bounds, fusions):
            row = (torch.zeros(f.spec.n_adapters, dtype=acc_dtype, device=device) if f.prior is None
                   else f.prior.to(device=device, dtype=acc_dtype))
            if f.index is None:
                prior[s:e] = row
            else:
                prior[s:e, f.index] = row
    M = None
    if any(f.inv_temperature != 1.0 or f.score_scale is not None for f in fusions):
        M = torch.ones(T, N, dtype=acc_dtype, device=device)  # float64 for float64: 1/T exactly as a scalar
        for (s, e), f in zip(plan.bounds, fusions):
            v = (torch.full((e - s, f.spec.n_adapters), f.inv_temperature, dtype=acc_dtype, device=device)
                 if f.score_scale is None else f.score_scale.to(acc_dtype) * f.inv_temperature)
            if f.index is None:
                M[s:e] = v
            else:
                M[s:e, f.index] = v
    return M, prior


def _per_token(plan: RoutePlan, flags: Sequence[bool], device) -> torch.Tensor:
    """[T, 1] bool: the flag of each sorted row's fusion."""
    return torch.tensor(list(flags), device=device)[plan.seg_ids].unsqueeze(-1)


def routed_fusion_layer(h: torch.Tensor, input_tensor: torch.Tensor, P: FusionParams, spec: LayerSpec,
                        plan: RoutePlan, fusions: Sequence[RoutedFusion], prims, seg_mm: Callable = seg_mm_torch
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Routed fusions on 2-D inputs h, input_tensor [T, d] (the batch's order).

    ``P``: the block's tensors over all N adapters (no fusion maps); ``spec``: the block's site
    (prologue, epilogue, activation; n_adapters = N); ``fusions[k]`` serves segment k of ``plan``;
    all folded or none. Returns (out [T, d], p [T, N] in block adapter order, 0 outside each
    token's fusion; float32, float64 for float64)."""
    if prims.uniform_dtype:
        # as afkern.ops.layer: the kernels compute in h's dtype; the residual stream and the
        # LayerNorm weights keep theirs (float32 under autocast), only what feeds a GEMM is cast
        dt = h.dtype
        P = P.to(dt).replace(ln_weight=P.ln_weight, ln_bias=P.ln_bias)
        fusions = [f.cast(dt) for f in fusions]
    N, r, d = P.down_weight.shape
    NR = N * r
    device = h.device
    hs, xs = plan.sort(h), plan.sort(input_tensor)
    x, _, residual, pre = prologue(hs, xs, P, dataclasses.replace(spec, query_before_ln=False), prims)
    if prims.uniform_dtype:
        x = x.to(dt)
    qbl = [f.spec.query_before_ln for f in fusions]
    if not any(qbl):
        qin = x
    elif all(qbl):
        qin = hs
    else:
        qin = torch.where(_per_token(plan, qbl, device), hs, x)
    Wd, Wu = P.down_weight.reshape(NR, d), P.up_weight.reshape(NR, d)
    Z = torch.addmm(P.down_bias.reshape(NR), x, Wd.t())

    folded = fusions[0].folded is not None
    rb = [f.spec.residual_before for f in fusions]
    shared = None
    if folded:
        AS = seg_mm(qin, [f.folded.w_q for f in fusions], plan, [f.folded.b_q for f in fusions])
    else:
        q = seg_mm(qin, [None if f.query_weight is None else f.query_weight.t() for f in fusions], plan,
                   [f.query_bias for f in fusions])
        qp = seg_mm(q, [f.key_weight for f in fusions], plan)
        if any(f.score_scale is not None for f in fusions):
            # under score dropout the terms equal for all adapters no longer cancel (ops/layer.py)
            kb = [f.key_bias for f in fusions]
            if any(b is not None for b in kb):
                rows = torch.stack([b if b is not None else torch.zeros_like(q[0]) for b in kb])
                shared = (q * rows.to(q.dtype)[plan.seg_ids]).sum(-1)
            if any(rb):
                term = (qp * residual).sum(-1) * _per_token(plan, rb, device).squeeze(-1).to(qp.dtype)
                shared = term if shared is None else shared + term
        AS = qp @ torch.cat([Wu, P.up_bias], 0).t()
    A, sb = AS[:, :NR], AS[:, NR:]
    if shared is not None:
        sb = sb + shared.unsqueeze(-1)
    acc_dtype = torch.float64 if Z.dtype == torch.float64 else torch.float32
    M, prior = _row_inputs(fusions, plan, N, device, acc_dtype)
    Y, p = prims.rowop(Z, A, sb, N, spec.activation, 1.0, M, prior)

    any_rb = any(rb)
    reuse_pre = (pre is not None and spec.original_ln_after and spec.residual_before_ln is True and not any_rb)
    if folded:
        if any(f.folded.w_res is not None for f in fusions):
            res_term = seg_mm(residual.to(Y.dtype), [f.folded.w_res for f in fusions], plan)
        else:
            res_term = residual
        base = pre if reuse_pre else res_term
        wide = base if base.dtype != Y.dtype else None  # added after, in its own dtype (afkern.ops.layer)
        hidden = seg_mm(p.to(Y.dtype), [f.folded.w_out[NR:] for f in fusions], plan,
                        base=None if wide is not None else base)
        hidden = seg_mm(Y, [f.folded.w_out[:NR] for f in fusions], plan, base=hidden, accumulate=True)
        if wide is not None:
            hidden = wide + hidden
    else:
        mix = torch.mm(Y, Wu).addmm_(p.to(Y.dtype), P.up_bias.to(Y.dtype))
        if any_rb:
            rbt = _per_token(plan, rb, device)
            mix = torch.where(rbt, mix + residual.to(mix.dtype), mix)
            base = torch.where(rbt, torch.zeros_like(residual), residual)
        else:
            base = pre if reuse_pre else residual
        wide = base if base.dtype != mix.dtype else None
        hidden = seg_mm(mix, [None if f.value_weight is None else f.value_weight.t() for f in fusions], plan,
                        base=None if wide is not None else base)
        if wide is not None:
            hidden = wide + hidden
    if reuse_pre:
        out = norm_only(prims, hidden, P, spec)
    elif spec.original_ln_after:
        out = add_norm(prims, hidden, xs, P, spec)
    else:
        out = hidden
    return plan.unsort(out), plan.unsort(p)


def routed_adapter_layer(h: torch.Tensor, input_tensor: torch.Tensor, P: FusionParams, spec: LayerSpec,
                         plan: RoutePlan, adapters: Sequence[int], prims, seg_mm: Callable = seg_mm_torch
                         ) -> torch.Tensor:
    """One adapter per token, no fusion: ``norm(dropout(up_a) + residual + input)`` with
    ``up_a = act(x Wd_a^T + bd_a) Wu_a + bu_a`` for adapter ``adapters[k]`` on segment k.
    ``spec.adapter_dropout`` is AdapterHub's adapter dropout (training). Returns out [T, d]."""
    if prims.uniform_dtype:
        P = P.to(h.dtype).replace(ln_weight=P.ln_weight, ln_bias=P.ln_bias)
    hs, xs = plan.sort(h), plan.sort(input_tensor)
    x, _, residual, _ = prologue(hs, xs, P, spec, prims)
    if prims.uniform_dtype:
        x = x.to(h.dtype)
    down = seg_mm(x, [P.down_weight[a].t() for a in adapters], plan, [P.down_bias[a] for a in adapters])
    G = activation_fn(spec.activation)(down)
    up = seg_mm(G, [P.up_weight[a] for a in adapters], plan, [P.up_bias[a] for a in adapters])
    if spec.adapter_dropout > 0:
        up = F.dropout(up, spec.adapter_dropout, training=True)
    hidden = up + residual
    if spec.original_ln_after:
        hidden = add_norm(prims, hidden, xs, P, spec)
    return plan.unsort(hidden)
