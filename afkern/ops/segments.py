"""Segments: the tokens of one layer call grouped by what serves them (docs/DESIGN.md section 7).

A layer call is a :class:`SegmentPlan`: the tokens sorted so that each fusion (or single adapter)
owns one contiguous *segment* of rows (``rows``, a :class:`RoutePlan`), and one :class:`Segment`
per segment with that fusion's maps, temperature, score dropout, control and folded weights. The
plain forward of a block is the degenerate plan: one segment over every token in batch order
(``rows`` None, no gather), as vLLM's LoRA layer treats one adapter as a one-segment mapping;
``afkern.route`` gives many. ``afkern.ops.layer.fusion_layer`` is the one layer over a plan.

A backend brings a segmented GEMM (:func:`seg_mm_torch`: a loop over the K segments of torch
GEMMs, no copy of any [T, N r] tensor; the triton backend's ``kernels/segmented.py``: one launch
for every segment); with one segment it is one GEMM.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .cache import Cache
from .fold import FoldedWeights
from .params import FusionParams, LayerSpec

__all__ = ["RoutePlan", "route_plan", "RoutedFold", "Segment", "SegmentPlan", "seg_mm", "seg_mm_torch",
           "strided_stack", "view_offsets", "row_inputs", "per_token"]


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

    def row_segments(self) -> torch.Tensor:
        """int32 [T]: the segment of each sorted row (on the device), cached."""
        return self._tables.get("rows", lambda: self.seg_ids.to(torch.int32))

    def offset_table(self, offsets: Tuple[int, ...]) -> torch.Tensor:
        """int64 [S]: ``offsets`` (one per segment, :func:`view_offsets`) on the device, cached."""
        return self._tables.get(("offsets", offsets), lambda: torch.tensor(offsets, dtype=torch.int64).to(
            self.seg_ids.device))

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


def _cast_fold(f, dtype):
    if f is None:
        return None
    if isinstance(f, RoutedFold):
        return f.to(dtype)
    if f.w_in.dtype == dtype:
        return f
    return FoldedWeights(*(_cast(t, dtype) for t in (f.w_in, f.b_in, f.w_q, f.b_q, f.w_out, f.w_res)))


@dataclass
class Segment:
    """What serves one segment of a layer call: a fusion, or a single adapter (``spec.fusion``
    False, the adapter ``spec.active`` of the block).

    ``index``: [n_k] int64, the block's adapters it mixes in its own order (None: all N in block
    order). ``spec``: its own LayerSpec (n_adapters = n_k). ``query_weight`` ... ``value_weight``:
    its maps (None when its config turns one off). ``inv_temperature``: 1 / its temperature of
    this forward (0 under a fixed-weights control). ``score_scale`` [T_k, n_k]: its score-dropout
    draw, or None. ``prior`` [n_k] (or [T_k, n_k]): its control's log-prior, or None. ``folded``:
    its folded maps (inference), or None (unfolded): a :class:`RoutedFold` over all N adapters of
    the block in a routed batch, the :class:`afkern.ops.fold.FoldedWeights` of the fusion when it
    serves every token. ``params``: its FusionParams over its own adapters, for the reference
    backend only (None elsewhere)."""

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
    folded: Optional[Union[RoutedFold, FoldedWeights]] = None
    params: Optional[FusionParams] = None

    def cast(self, dtype) -> "Segment":
        """Its maps and folded weights in ``dtype`` (differentiable casts)."""
        return dataclasses.replace(
            self, query_weight=_cast(self.query_weight, dtype), query_bias=_cast(self.query_bias, dtype),
            key_weight=_cast(self.key_weight, dtype), key_bias=_cast(self.key_bias, dtype),
            value_weight=_cast(self.value_weight, dtype), folded=_cast_fold(self.folded, dtype))


@dataclass
class SegmentPlan:
    """One layer call: ``segments[k]`` serves the sorted rows ``rows.bounds[k]``; ``rows`` None:
    one segment over every token in batch order (the plain forward)."""

    rows: Optional[RoutePlan]
    segments: List[Segment]

    @property
    def single(self) -> bool:
        return self.rows is None

    def sort(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else self.rows.sort(t)

    def unsort(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return t if self.rows is None or t is None else self.rows.unsort(t)


# ---------------------------------------------------------------------------------------------
# the segmented GEMM
# ---------------------------------------------------------------------------------------------


def seg_mm(impl, x, weights, plan: SegmentPlan, biases=None, base=None, accumulate=False):
    """A backend's segmented GEMM ``impl`` over ``plan``'s segments; one GEMM for one segment."""
    if plan.rows is None:
        return _one_segment(x, weights[0], None if biases is None else biases[0], base)
    return impl(x, weights, plan.rows, biases, base, accumulate)


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


def view_offsets(weights: Sequence[Optional[torch.Tensor]]) -> Optional[Tuple[int, ...]]:
    """Each weight's element offset from the first one's when all are views of one storage with
    one shape, stride and dtype (the folds of ``afkern.compiler.routed_folds``, in any order),
    else None: a kernel then reads segment k's map at ``weights[0] + offsets[k]``, no copy."""
    if any(w is None for w in weights):
        return None
    w0 = weights[0]
    base = w0.untyped_storage().data_ptr()
    for w in weights[1:]:
        if (w.untyped_storage().data_ptr() != base or w.shape != w0.shape or w.stride() != w0.stride()
                or w.dtype != w0.dtype):
            return None
    return tuple(w.storage_offset() - w0.storage_offset() for w in weights)


def strided_stack(weights: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The weights as one [S, K, N] tensor WITHOUT a copy when they are equally spaced views of one
    storage (:func:`view_offsets`, a positive constant step: the stacked folds of
    ``afkern.compiler.routed_folds`` for fusions consecutive in the block), else None."""
    offs = view_offsets(weights)
    if offs is None:
        return None
    w0 = weights[0]
    if len(weights) == 1:
        return w0.unsqueeze(0)
    step = offs[1]
    if step <= 0 or any(o != i * step for i, o in enumerate(offs)):
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
# per-token row-op inputs of a routed batch
# ---------------------------------------------------------------------------------------------


def row_inputs(fusions: Sequence[Segment], plan: RoutePlan, N: int, device, acc_dtype):
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


def per_token(plan: RoutePlan, flags: Sequence[bool], device) -> torch.Tensor:
    """[T, 1] bool: the flag of each sorted row's fusion."""
    return torch.tensor(list(flags), device=device)[plan.seg_ids].unsqueeze(-1)
