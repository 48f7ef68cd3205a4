"""Segmented GEMMs of the routed layer (docs/DESIGN.md section 7, ``afkern.ops.segments``): one launch
serves every fusion of a mixed batch.

The rows of X are sorted by route, so segment k (fusion k's tokens) is the row range
[start_k, end_k). Each GEMM of the routed layer that depends on the fusion is

    OUT[t, :] = BASE[t, :] + X[t, :] @ W[k(t)] + B[k(t)]        for every row t          (forward)

with W [S, K, N] the stacked weights of the S segments. As MoE kernels do (vLLM's ``fused_moe``
aligns every expert's tokens to the token block), the host cuts every segment into tiles of
BLOCK_T rows that never straddle two segments and writes a table (segment, first row, end row)
per tile: a program owns one tile and one BLOCK_N column block, reads its segment's weights and
runs an ordinary tiled GEMM over K. One launch covers every segment, whatever their sizes; a
segment wastes at most one partial tile.

Backward, per segment k with rows R_k:

    dX[t]  = dOUT[t] @ W[k(t)]^T          the same kernel with W's strides swapped
    dW[k]  = X[R_k]^T @ dOUT[R_k]         ``_seg_wgrad_kernel``: grid (S, K tiles, N tiles), each
                                          program reduces over its segment's rows
    dB[k]  = sum_{t in R_k} dOUT[t]       one ``index_add_`` on the segment ids
    dBASE  = dOUT
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops.cache import Cache
from ..ops.limits import MAX_INDEX
from ..ops.segments import strided_stack
from .common import INTERPRET, mma

__all__ = ["seg_mm_triton", "seg_tiles", "wgrad_tiles", "SegMMTriton"]


def seg_tiles(dtype: torch.dtype):
    """(BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages) of the forward / data-gradient kernel.
    BLOCK_T is fixed per dtype because the host builds the tile table with it."""
    if INTERPRET:
        return 16, 32, 32, 4, 1
    if dtype == torch.float32:
        return 32, 32, 32, 4, 2
    return 64, 64, 32, 4, 3


def wgrad_tiles(dtype: torch.dtype):
    """(BLOCK_K, BLOCK_N, BLOCK_T, num_warps, num_stages) of the weight-gradient kernel."""
    if INTERPRET:
        return 32, 32, 16, 4, 1
    if dtype == torch.float32:
        return 32, 32, 32, 4, 2
    return 64, 64, 32, 4, 3


@triton.jit
def _seg_mm_kernel(
    X,  # [T, K] input rows sorted by segment (column stride 1)
    W,  # stacked weights: element (s, k, n) at W + s*s_ws + k*s_wk + n*s_wn
    B,  # biases: element (s, n) at B + s*s_bs + n; unused unless HAS_B
    BASE,  # [T, N] added to the product (column stride 1); unused unless HAS_BASE
    OUT,  # [T, N] output (column stride 1), X's dtype
    TAB,  # int32 [3, n_tiles]: segment, first row and end row (exclusive) of every token tile
    n_tiles,  # number of token tiles (the grid's first axis)
    KD,  # reduction length K
    ND,  # output width N
    stride_x, s_ws, s_wk, s_wn, s_bs, stride_base, stride_out,  # strides (see X, W, B, BASE, OUT)
    HAS_B: tl.constexpr,  # add the segment's bias
    HAS_BASE: tl.constexpr,  # add BASE
    IEEE: tl.constexpr,  # float32 operands: exact-product dots
    BLOCK_T: tl.constexpr,  # token tile (the host's table uses the same)
    BLOCK_N: tl.constexpr,  # output-column tile
    BLOCK_K: tl.constexpr,  # reduction tile
):
    """Grid (n_tiles, cdiv(ND, BLOCK_N)). Tiles: x [BLOCK_T, BLOCK_K], w [BLOCK_K, BLOCK_N],
    accumulator [BLOCK_T, BLOCK_N] float32."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(TAB + pid)
    r0 = tl.load(TAB + n_tiles + pid)
    r1 = tl.load(TAB + 2 * n_tiles + pid)
    rows = r0 + tl.arange(0, BLOCK_T)
    rmask = rows < r1
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < ND
    kk = tl.arange(0, BLOCK_K)
    w_seg = W + seg.to(tl.int64) * s_ws
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        ks = k0 + kk
        kmask = ks < KD
        x = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_seg + ks[:, None] * s_wk + cols[None, :] * s_wn, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = mma(x, w, acc, IEEE)
    if HAS_B:
        acc += tl.load(B + seg * s_bs + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    om = rmask[:, None] & cmask[None, :]
    if HAS_BASE:
        acc += tl.load(BASE + rows[:, None] * stride_base + cols[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], acc.to(OUT.dtype.element_ty), mask=om)


@triton.jit
def _seg_wgrad_kernel(
    X,  # [T, K] forward input rows (column stride 1)
    DY,  # [T, N] output gradient rows (column stride 1)
    DW,  # [S, K, N] float32 output: element (s, k, n) at DW + s*s_dws + k*s_dwk + n
    SEGS,  # int32 [2, S]: first row and end row (exclusive) of every segment
    S,  # segments
    KD,  # K
    ND,  # N
    stride_x, stride_dy, s_dws, s_dwk,  # strides (see X, DY, DW)
    IEEE: tl.constexpr,  # float32 operands: exact-product dots
    BLOCK_K: tl.constexpr,  # K tile (rows of dW)
    BLOCK_N: tl.constexpr,  # N tile (columns of dW)
    BLOCK_T: tl.constexpr,  # reduction tile over the segment's rows
):
    """Grid (S, cdiv(KD, BLOCK_K), cdiv(ND, BLOCK_N)): dW[s] tile = X[rows_s]^T @ DY[rows_s].
    Tiles: x^T [BLOCK_K, BLOCK_T], dy [BLOCK_T, BLOCK_N], accumulator [BLOCK_K, BLOCK_N] float32."""
    seg = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    r0 = tl.load(SEGS + seg)
    r1 = tl.load(SEGS + S + seg)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < KD
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < ND
    tt = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for t0 in range(r0, r1, BLOCK_T):
        rows = t0 + tt
        rmask = rows < r1
        xt = tl.load(X + rows[None, :] * stride_x + ks[:, None], mask=kmask[:, None] & rmask[None, :], other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = mma(xt, dy, acc, IEEE)
    tl.store(DW + seg.to(tl.int64) * s_dws + ks[:, None] * s_dwk + ns[None, :], acc,
             mask=kmask[:, None] & nmask[None, :])


def _launch_mm(x, W, b, base, plan, swap: bool = False):
    """OUT = BASE + x @ W[seg] (+ b[seg]); ``swap``: use W[seg]^T (the data gradient)."""
    T, KD = x.shape
    s_ws, s_wk, s_wn = W.stride()
    ND = W.shape[1] if swap else W.shape[2]
    if swap:
        s_wk, s_wn = s_wn, s_wk
    out = torch.empty(T, ND, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    BT, BN, BK, nw, ns = seg_tiles(x.dtype)
    tab, n_tiles = plan.block_table(BT)
    _seg_mm_kernel[(n_tiles, triton.cdiv(ND, BN))](
        x, W, b if b is not None else W, base if base is not None else out, out, tab, n_tiles, KD, ND,
        x.stride(0), s_ws, s_wk, s_wn, b.stride(0) if b is not None else 0,
        base.stride(0) if base is not None else 0, out.stride(0),
        HAS_B=b is not None, HAS_BASE=base is not None, IEEE=x.dtype == torch.float32,
        BLOCK_T=BT, BLOCK_N=BN, BLOCK_K=BK, num_warps=nw, num_stages=ns,
    )
    return out


def _launch_wgrad(x, dy, plan):
    S = len(plan.bounds)
    KD, ND = x.shape[1], dy.shape[1]
    dW = torch.zeros(S, KD, ND, dtype=torch.float32, device=x.device)
    if x.shape[0] == 0:
        return dW
    BK, BN, BT, nw, ns = wgrad_tiles(x.dtype)
    _seg_wgrad_kernel[(S, triton.cdiv(KD, BK), triton.cdiv(ND, BN))](
        x, dy, dW, plan.segment_table(), S, KD, ND, x.stride(0), dy.stride(0), dW.stride(0), dW.stride(1),
        IEEE=x.dtype == torch.float32, BLOCK_K=BK, BLOCK_N=BN, BLOCK_T=BT, num_warps=nw, num_stages=ns,
    )
    return dW


class SegMMTriton(torch.autograd.Function):
    """out = base + x @ W[seg] + b[seg] over the segments of a route plan (module docstring):
    x [T, K], W [S, K, N], b [S, N] or None, base [T, N] or None; all one dtype."""

    @staticmethod
    def forward(ctx, x, W, b, base, plan):
        out = _launch_mm(x, W, b, base, plan)
        ctx.save_for_backward(x, W)
        ctx.plan = plan
        ctx.has = (b is not None, base is not None)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        plan = ctx.plan
        has_b, has_base = ctx.has
        dout = dout.contiguous()
        ng = ctx.needs_input_grad
        dx = _launch_mm(dout, W, None, None, plan, swap=True) if ng[0] else None
        dW = _launch_wgrad(x, dout, plan).to(W.dtype) if ng[1] else None
        db = None
        if has_b and ng[2]:
            db = torch.zeros(len(plan.bounds), dout.shape[1], dtype=torch.float32, device=dout.device)
            db = db.index_add_(0, plan.seg_ids, dout.float()).to(dout.dtype)
        dbase = dout if has_base and ng[3] else None
        return dx, dW, db, dbase, None


#: keyed on storage and version counters, built under a lock (one model, many threads)
_STACKS = Cache(limit=16)


def _stack(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack of the segments' weights; without autograd cached on the tensors' storage and
    version counters (the folded inference maps change only when a weight does). A cache entry
    holds its source tensors, so no other tensor can reuse their addresses while it lives."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return torch.stack(list(ts))
    key = tuple((t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device) for t in ts)
    return _STACKS.get(key, lambda: (torch.stack(list(ts)), list(ts)))[0]


def seg_mm_triton(x: torch.Tensor, weights: Sequence[Optional[torch.Tensor]], plan,
                  biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                  base: Optional[torch.Tensor] = None, accumulate: bool = False) -> torch.Tensor:
    """The segmented GEMM primitive of the routed layer (``afkern.ops.segments.seg_mm_torch``'s
    signature): ``out[s:e] = base[s:e] + x[s:e] @ weights[k] + biases[k]`` for every segment k, in
    ONE kernel launch (a None weight is the identity). x [T, K] and the weights share a dtype.
    ``accumulate`` is accepted and not needed: the kernel reads ``base`` in its epilogue."""
    T, KD = x.shape
    n = next((w.shape[1] for w in weights if w is not None), KD)
    if T * max(KD, n) > MAX_INDEX:
        raise ValueError(f"triton backend: {T} tokens x width {max(KD, n)} exceeds the kernels' int32 indexing "
                         "(2**31 elements per tensor); split the batch")
    eye = None
    ws = []
    for w in weights:
        if w is None:
            if eye is None:
                eye = torch.eye(KD, dtype=x.dtype, device=x.device)
            w = eye
        ws.append(w)
    # the stacked folds of consecutive fusions are read in place (inference only: as_strided
    # over one view's storage would not route gradients to the others)
    grad = torch.is_grad_enabled() and any(w.requires_grad for w in ws)
    W = None if grad else strided_stack(ws)
    if W is None:
        W = _stack(ws)
    b = None
    if biases is not None and any(v is not None for v in biases):
        b = _stack([v if v is not None else torch.zeros(n, dtype=x.dtype, device=x.device) for v in biases])
    if base is not None:
        base = base.to(x.dtype).contiguous()
    return SegMMTriton.apply(x.contiguous(), W, b, base, plan)
