"""Triton kernels of the re-associated AdapterFusion layer (backend ``"triton"``).

The math is DESIGN.md section 2 and the row-op contract of ``afkern.ops.rowop``; the semantics
are exactly those of :func:`afkern.ops.fusion.fusion_layer_torch` (which is the test oracle
together with the naive ``afkern.ops.reference``). Notation, per token t (rows), adapter n,
bottleneck column j < r, hidden column k < d:

    x      [T, d]      adapter input (LayerNorm(h + input_tensor) in the Pfeiffer placement)
    q      [T, d]      query-side input: q' = (query Wq^T + bq) Wk unfolded, x or query folded
    Z_n    [T, r]      = x Wd_n^T + bd_n                       (down-projection, pre-activation)
    A_n    [T, r]      = q Wa_n + ba_n                         (Wa_n = Wu_n^T unfolded, ba = 0)
    sb_n   [T]         = q . ws_n + bs_n                       (ws_n = bu_n unfolded, bs = 0)
    G_n               = act(Z_n)
    s_n               = sum_j A_nj G_nj + sb_n                  (score, up to a constant over n)
    p                 = softmax_n(s * M * inv_temperature)      (M: score-dropout scale or 1)
    mix    [T, d]      = [p_1 G_1 | ... | p_N G_N] @ Wu_cat + p @ bu (+ residual)

Kernels (one program = one tile; shapes of each tile are in the kernel docstrings):

- ``_add_ln_fwd_kernel`` / ``_add_ln_bwd_kernel``: y = LayerNorm(x + residual), as in Triton's
  05-layer-norm tutorial with the residual add fused; autograd Function ``AddLayerNormTriton``.
- ``_fusion_scores_kernel_impl``: a program owns BLOCK_T tokens and ONE adapter n; it runs both GEMMs
  over d (``x Wd_n^T`` and ``q Wa_n``) with ``tl.dot``, applies the bias and the activation in
  registers and reduces the score s_n. It writes s [T, N] and Z (training) or G (inference),
  plus A when a backward will need it; never an [N, T, d] tensor.
- ``_fusion_softmax_kernel``: p = softmax over N of s * M * inv_temperature, [T, N] float32.
- ``_fusion_mix_kernel_impl``: the p-scaled up-projection as one GEMM over K = N*r whose prologue
  forms p_n * act(Z_n) tile by tile, then ``p @ bu`` (a second small ``tl.dot``) and the residual
  in the epilogue. With folded inference weights the same kernel reads ``w_out`` (Wu_cat Wv^T).
- ``_rowop_fwd_kernel`` / ``_rowop_bwd_kernel``: the row op of ``afkern.ops.rowop`` alone,
  between torch GEMMs (the fallback, ``rowop_triton``), and the backward building block.

Backward of the fused core (``_FusionCoreTriton``): the weight and input gradients are plain
GEMMs left to cuBLAS (see docs/KERNELS_TRITON.md for why); the N-wide row work is the Triton
row-op backward kernel, which also rebuilds Y = p G for dWu so Y is never stored.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..activations import activation_code
from ..ops.fusion import shared_score, layer_prologue
from ..ops.params import FusionParams, LayerSpec
from ..ops.reference import single_adapter_output
from ..ops.rowop import check_rowop_inputs

__all__ = [
    "fusion_layer_triton",
    "add_layer_norm_triton",
    "rowop_triton",
    "rowop_forward_triton",
    "rowop_backward_triton",
    "fusion_core_triton",
    "scores_configs",
    "mix_configs",
    "block_r",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK_R = 64  # cap on the r-tile of the scores kernel: larger r loops over r-tiles
_MAX_ELEMS = 2**31 - 1  # kernels index with int32 offsets (fewer registers than int64 addresses)


# ---------------------------------------------------------------------------------------------
# activations: forward and derivative in float32, codes from afkern.activations.KERNEL_ACTIVATIONS
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh through exp of a non-positive argument: no overflow, absolute error ~1 ulp of 1.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z) for the kernel code ACT (0 linear, 1 relu, 2 gelu(erf), 3 gelu_tanh, 4 silu, 5 tanh,
    6 sigmoid, 7 leakyrelu(0.01), 8 quick_gelu); z is float32."""
    if ACT == 0:
        return z
    elif ACT == 1:
        return tl.maximum(z, 0.0)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return 0.5 * z * (1.0 + _tanh(u))
    elif ACT == 4:
        return z * tl.sigmoid(z)
    elif ACT == 5:
        return _tanh(z)
    elif ACT == 6:
        return tl.sigmoid(z)
    elif ACT == 7:
        return tl.where(z > 0, z, 0.01 * z)
    else:
        return z * tl.sigmoid(1.702 * z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, the closed forms of afkern.activations.activation_grad."""
    if ACT == 0:
        return tl.full(z.shape, 1.0, tl.float32)
    elif ACT == 1:
        return tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = _tanh(u)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    elif ACT == 4:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 5:
        t = _tanh(z)
        return 1.0 - t * t
    elif ACT == 6:
        s = tl.sigmoid(z)
        return s * (1.0 - s)
    elif ACT == 7:
        return tl.where(z > 0, 1.0, 0.01)
    else:
        s = tl.sigmoid(1.702 * z)
        return s + 1.702 * z * s * (1.0 - s)


# The interpreter's tl.dot on bfloat16 operands returns garbage (seen with triton 3.9 on CPU);
# interpreting, the operands are widened to float32 first: the same exact products and float32
# accumulation as the tensor-core path. Compiled code never takes that branch.
_INTERP_DOT_F32 = tl.constexpr(INTERPRET)


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    # float32 operands: full-precision products ("ieee") to match torch's default float32 matmul
    # (TF32 off); bf16/fp16 operands: tensor-core MMA with float32 accumulation.
    if _INTERP_DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ---------------------------------------------------------------------------------------------
# 1. residual add + LayerNorm
# ---------------------------------------------------------------------------------------------
# Forward, per row:  u = x + res;  mu = mean(u);  rstd = 1 / sqrt(mean((u - mu)^2) + eps)
#                    xhat = (u - mu) * rstd;  y = xhat * w + b
# Backward, per row, with wdy = w * dy (the tutorial's derivation):
#                    du = rstd * (wdy - (xhat * mean(xhat * wdy) + mean(wdy)))
#                    dx = dres = du;  dw = sum_rows dy * xhat;  db = sum_rows dy
# dw/db are reduced in two stages: each program sums its rows into one row of a
# [programs, d] float32 buffer, torch sums the buffer (deterministic, no atomics).


@triton.jit
def _add_ln_fwd_kernel(
    X,  # [T, D] first summand (the sub-layer output h)
    RES,  # [T, D] second summand (input_tensor); unused unless HAS_RES
    W,  # [D] LayerNorm weight; unused unless HAS_W
    B,  # [D] LayerNorm bias; unused unless HAS_B
    Y,  # [T, D] output, X's dtype
    MEAN,  # [T] float32: per-row mean, saved for the backward
    RSTD,  # [T] float32: per-row 1/std, saved for the backward
    stride_x,  # row stride of X (elements)
    stride_res,  # row stride of RES
    stride_y,  # row stride of Y
    D,  # hidden size d
    eps,  # LayerNorm epsilon
    HAS_RES: tl.constexpr,  # add RES before normalising
    HAS_W: tl.constexpr,  # elementwise-affine weight present
    HAS_B: tl.constexpr,  # elementwise-affine bias present
    BLOCK_D: tl.constexpr,  # next power of two >= D: one program holds a whole row
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    u = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        u += tl.load(RES + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(u, axis=0) / D
    uc = tl.where(mask, u - mean, 0.0)
    var = tl.sum(uc * uc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = uc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _add_ln_bwd_kernel(
    X,  # [T, D] first summand of the forward
    RES,  # [T, D] second summand; unused unless HAS_RES
    W,  # [D] LayerNorm weight; unused unless HAS_W
    DY,  # [T, D] upstream gradient
    DX,  # [T, D] output: gradient of both summands (X's dtype)
    DW_PART,  # [programs, D] float32 output: this program's partial sum of dy * xhat
    DB_PART,  # [programs, D] float32 output: this program's partial sum of dy
    MEAN,  # [T] float32 from the forward
    RSTD,  # [T] float32 from the forward
    stride_x,  # row stride of X
    stride_res,  # row stride of RES
    stride_dy,  # row stride of DY
    stride_dx,  # row stride of DX
    T,  # number of rows
    D,  # hidden size
    ROWS_PER_PROG,  # rows handled by one program (contiguous range)
    HAS_RES: tl.constexpr,  # the forward added RES
    HAS_W: tl.constexpr,  # weight present (else w = 1)
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG):
        row = row_start + i
        # the last program's range may run past T; the row test is made a vector so it is a
        # tensor mask under every triton version (3.6 and 3.9 interpreters included)
        m = mask & ((row + cols * 0) < T)
        u = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            u += tl.load(RES + row * stride_res + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row + cols * 0, mask=m, other=0.0)  # broadcast: one cached address
        rstd = tl.load(RSTD + row + cols * 0, mask=m, other=0.0)
        xhat = tl.where(m, (u - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / D
        c2 = tl.sum(wdy, axis=0) / D
        du = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * stride_dx + cols, du.to(DX.dtype.element_ty), mask=m)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * D + cols, dw, mask=mask)
    tl.store(DB_PART + pid * D + cols, db, mask=mask)


def _ln_warps(block_d: int) -> int:
    return min(max(block_d // 256, 1), 8)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


class AddLayerNormTriton(torch.autograd.Function):
    """y = LayerNorm(x + residual) with Triton forward and backward (residual may be None)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        T, D = x.shape
        y = torch.empty_like(x)
        mean = torch.empty(T, dtype=torch.float32, device=x.device)
        rstd = torch.empty(T, dtype=torch.float32, device=x.device)
        BLOCK_D = triton.next_power_of_2(D)
        res = residual if residual is not None else x
        _add_ln_fwd_kernel[(T,)](
            x, res, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd,
            x.stride(0), res.stride(0), y.stride(0), D, float(eps),
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_D=BLOCK_D, num_warps=_ln_warps(BLOCK_D),
        )
        ctx.save_for_backward(x, residual, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, residual, weight, mean, rstd = ctx.saved_tensors
        T, D = x.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        progs = max(1, min(T, 4 * _num_sms(x.device)))
        rows_per = triton.cdiv(T, progs)
        progs = triton.cdiv(T, rows_per)
        dw_part = torch.empty(progs, D, dtype=torch.float32, device=x.device)
        db_part = torch.empty(progs, D, dtype=torch.float32, device=x.device)
        BLOCK_D = triton.next_power_of_2(D)
        res = residual if residual is not None else x
        _add_ln_bwd_kernel[(progs,)](
            x, res, weight if weight is not None else x, dy, dx, dw_part, db_part, mean, rstd,
            x.stride(0), res.stride(0), dy.stride(0), dx.stride(0), T, D, rows_per,
            HAS_RES=residual is not None, HAS_W=weight is not None, BLOCK_D=BLOCK_D,
            num_warps=_ln_warps(BLOCK_D),
        )
        dw = dw_part.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        db = db_part.sum(0).to(weight.dtype if weight is not None else x.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        dres = dx if residual is not None and ctx.needs_input_grad[1] else None
        return dx, dres, dw, db, None


def add_layer_norm_triton(x, residual, weight, bias, eps):
    """LayerNorm(x + residual) over the last dim of 2-D ``x``/``residual`` [T, d] (residual may be
    None); same signature as ``afkern.ops.fusion.add_layer_norm_torch``."""
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    return AddLayerNormTriton.apply(x, residual, weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# 2. fused scores: two GEMMs over d + bias + activation + score reduction, per (token block, n)
# ---------------------------------------------------------------------------------------------

def _cfg(bt, bk, w, s, **extra):
    return triton.Config(dict(BLOCK_T=bt, BLOCK_K=bk, **extra), num_warps=w, num_stages=s)


# Autotune candidates. Every entry compiles with no register spill and within the per-block
# shared memory of its architecture (tests/test_triton_compile.py checks exactly these lists).
# First entry of each list: the small default. sm_90 adds the wgmma-friendly 64-row tiles with
# 8 warps that spill a few bytes on sm_80's mma.sync path.
_SCORES_BF16 = [(32, 32, 4, 2), (64, 32, 4, 3), (128, 32, 8, 4)]
_SCORES_BF16_SM90 = [(64, 64, 8, 3), (64, 64, 8, 4), (128, 64, 8, 3)]
_SCORES_F32 = [(32, 32, 8, 2), (32, 16, 4, 2)]
_MIX_BF16 = [(32, 32, 32, 4, 2), (64, 64, 128, 4, 3), (128, 64, 128, 8, 3), (128, 32, 64, 4, 4)]
_MIX_F32 = [(32, 32, 32, 4, 2)]


def scores_configs(arch: int, fp32: bool = False):
    """Autotune configs of the scores kernel on sm_<arch> (80, 90, ...); one small config when
    interpreting."""
    if INTERPRET:
        return [_cfg(16, 64, 4, 1)]
    rows = _SCORES_F32 if fp32 else _SCORES_BF16 + (_SCORES_BF16_SM90 if arch >= 90 else [])
    return [_cfg(*c) for c in rows]


def mix_configs(arch: int, fp32: bool = False):
    """Autotune configs of the mix kernel on sm_<arch>; one small config when interpreting."""
    if INTERPRET:
        return [_cfg(16, 64, 4, 1, BLOCK_D=64)]
    rows = _MIX_F32 if fp32 else _MIX_BF16
    return [_cfg(bt, bk, w, s, BLOCK_D=bd) for bt, bk, bd, w, s in rows]


def _arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def block_r(r: int) -> int:
    """The r-tile of the scores kernel: r padded to a power of two >= 16 (tl.dot minimum), capped
    at 64; a larger r is covered by a loop over r-tiles inside the program."""
    return min(_MAX_BLOCK_R, max(16, triton.next_power_of_2(r)))


@triton.jit
def _fusion_scores_kernel_impl(
    X,  # [T, D] adapter input x
    Q,  # [T, D] query-side input q
    WD,  # down weights: element (k, c), k < D, c < N*R, at WD + k*s_wd_k + c*s_wd_c
    BD,  # [N*R] down bias
    WA,  # query pull-back weights: element (k, c) at WA + k*s_wa_k + c*s_wa_c
    BA,  # [N*R] bias of A (folded weights); unused unless HAS_BA
    WS,  # score-bias weights: element (k, n) at WS + k*s_ws_k + n*s_ws_n
    BS,  # [N] bias of sb (folded weights); unused unless HAS_BS
    SC,  # [T] score term shared by all adapters (kept under score dropout); unused unless HAS_SC
    S,  # [T, N] float32 output: scores before dropout scale and temperature
    ZG,  # [T, N*R] output: Z (STORE_G False) or G = act(Z) (STORE_G True), X's dtype
    A,  # [T, N*R] output A, X's dtype; written only if STORE_A
    T,  # tokens
    D,  # hidden size d (the GEMMs' reduction length)
    R,  # bottleneck r
    stride_x, stride_q,  # row strides of X, Q
    s_wd_k, s_wd_c, s_wa_k, s_wa_c, s_ws_k, s_ws_n,  # weight strides (see WD, WA, WS)
    stride_s, stride_zg, stride_a,  # row strides of S, ZG, A
    ACT: tl.constexpr,  # activation code
    HAS_BA: tl.constexpr,  # add BA to A
    HAS_BS: tl.constexpr,  # add BS to sb
    HAS_SC: tl.constexpr,  # add SC to every adapter's score
    STORE_A: tl.constexpr,  # write A (a backward will need it)
    STORE_G: tl.constexpr,  # write G instead of Z (inference: the mix kernel then skips act)
    IEEE: tl.constexpr,  # float32 operands: exact-product dots
    BLOCK_T: tl.constexpr,  # token tile (autotuned)
    BLOCK_R: tl.constexpr,  # r tile (>= 16, power of two; host: block_r(R))
    BLOCK_K: tl.constexpr,  # reduction tile over d (autotuned)
):
    """Grid (cdiv(T, BLOCK_T), N). Tiles: x, q [BLOCK_T, BLOCK_K]; Wd_n, Wa_n [BLOCK_K, BLOCK_R];
    accumulators Z, A [BLOCK_T, BLOCK_R] float32; s [BLOCK_T] float32."""
    pid_t = tl.program_id(0)
    n = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T))
    rmask = rows < T
    kk = tl.arange(0, BLOCK_K)
    jj = tl.arange(0, BLOCK_R)
    out_ty = ZG.dtype.element_ty

    # sb_n = q . ws_n (+ bs_n): a matrix-vector product, once per program.
    sb = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + kk
        kmask = ks < D
        q = tl.load(Q + rows[:, None] * stride_q + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        ws = tl.load(WS + ks * s_ws_k + n * s_ws_n, mask=kmask, other=0.0)
        sb += tl.sum(q.to(tl.float32) * ws.to(tl.float32)[None, :], axis=1)
    if HAS_BS:
        sb += tl.load(BS + n).to(tl.float32)
    if HAS_SC:
        sb += tl.load(SC + rows, mask=rmask, other=0.0).to(tl.float32)

    s = sb
    for j0 in range(0, R, BLOCK_R):
        js = j0 + jj
        jmask = js < R
        cols = n * R + js
        accz = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        acca = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + kk
            kmask = ks < D
            m2 = rmask[:, None] & kmask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=m2, other=0.0)
            q = tl.load(Q + rows[:, None] * stride_q + ks[None, :], mask=m2, other=0.0)
            wm = kmask[:, None] & jmask[None, :]
            wd = tl.load(WD + ks[:, None] * s_wd_k + cols[None, :] * s_wd_c, mask=wm, other=0.0)
            wa = tl.load(WA + ks[:, None] * s_wa_k + cols[None, :] * s_wa_c, mask=wm, other=0.0)
            accz = _mma(x, wd, accz, IEEE)
            acca = _mma(q, wa, acca, IEEE)
        accz += tl.load(BD + cols, mask=jmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BA:
            acca += tl.load(BA + cols, mask=jmask, other=0.0).to(tl.float32)[None, :]
        # round to the storage dtype first so the score, the mix and the backward all see the
        # same Z and A (the torch path holds them in the input dtype too)
        z = accz.to(out_ty)
        a = acca.to(out_ty)
        g = _act(z.to(tl.float32), ACT)
        s += tl.sum(tl.where(jmask[None, :], a.to(tl.float32) * g, 0.0), axis=1)
        om = rmask[:, None] & jmask[None, :]
        if STORE_G:
            tl.store(ZG + rows[:, None] * stride_zg + cols[None, :], g.to(out_ty), mask=om)
        else:
            tl.store(ZG + rows[:, None] * stride_zg + cols[None, :], z, mask=om)
        if STORE_A:
            tl.store(A + rows[:, None] * stride_a + cols[None, :], a, mask=om)
    tl.store(S + rows * stride_s + n, s, mask=rmask)


_TUNED = {}


def _tuned(which: str, device: torch.device, fp32: bool):
    """The autotuned launcher of a GEMM kernel for a device's architecture and operand precision."""
    arch = _arch(device)
    key = (which, arch, fp32)
    if key not in _TUNED:
        if which == "scores":
            _TUNED[key] = triton.autotune(configs=scores_configs(arch, fp32), key=["D", "R", "BLOCK_R"])(
                _fusion_scores_kernel_impl)
        else:
            _TUNED[key] = triton.autotune(configs=mix_configs(arch, fp32), key=["D", "R", "NADP"])(
                _fusion_mix_kernel_impl)
    return _TUNED[key]


# ---------------------------------------------------------------------------------------------
# 3. softmax over adapters
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fusion_softmax_kernel(
    S,  # [T, N] float32 scores
    M,  # [T, N] score-dropout scale (0 or 1/(1-p)); unused unless HAS_M
    P,  # [T, N] float32 output probabilities
    T,  # tokens
    NADP,  # adapters N
    stride_s, stride_m, stride_p,  # row strides
    inv_temperature,  # 1 / softmax temperature
    HAS_M: tl.constexpr,  # apply M
    BLOCK_T: tl.constexpr,  # token tile
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    """p = softmax_n(s * M * inv_temperature); grid (cdiv(T, BLOCK_T),)."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T))
    ns = tl.arange(0, BLOCK_N)
    m2 = (rows < T)[:, None] & (ns < NADP)[None, :]
    s = tl.load(S + rows[:, None] * stride_s + ns[None, :], mask=m2, other=0.0)
    if HAS_M:
        s = s * tl.load(M + rows[:, None] * stride_m + ns[None, :], mask=m2, other=0.0).to(tl.float32)
    s = tl.where((ns < NADP)[None, :], s * inv_temperature, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(P + rows[:, None] * stride_p + ns[None, :], p, mask=m2)


# ---------------------------------------------------------------------------------------------
# 4. mix: [p_1 G_1 | ... | p_N G_N] @ Wu_cat + p @ bu (+ residual)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fusion_mix_kernel_impl(
    ZG,  # [T, N*R] Z (APPLY_ACT) or G
    P,  # [T, N] float32 probabilities
    WU,  # up weights: element (c, k), c < N*R, k < D, at WU + c*s_wu_c + k*s_wu_k
    BU,  # up biases: element (n, k) at BU + n*s_bu_n + k*s_bu_k
    RES,  # [T, D] residual added in the epilogue; unused unless HAS_RES
    OUT,  # [T, D] output, ZG's dtype
    T,  # tokens
    D,  # hidden size (output width)
    R,  # bottleneck r
    NADP,  # adapters N
    stride_zg, stride_p,  # row strides of ZG, P
    s_wu_c, s_wu_k, s_bu_n, s_bu_k,  # weight strides
    stride_res, stride_out,  # row strides of RES, OUT
    ACT: tl.constexpr,  # activation code (used if APPLY_ACT)
    APPLY_ACT: tl.constexpr,  # ZG holds Z: apply act in the prologue
    HAS_RES: tl.constexpr,  # add RES
    IEEE: tl.constexpr,  # float32 operands: exact-product dots
    BLOCK_N: tl.constexpr,  # next power of two >= max(N, 16)
    BLOCK_T: tl.constexpr,  # token tile (autotuned)
    BLOCK_D: tl.constexpr,  # output-column tile (autotuned)
    BLOCK_K: tl.constexpr,  # reduction tile over N*R (autotuned)
):
    """Grid (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D)). Prologue tile Y = p[t, c // R] * act(Z[t, c]),
    [BLOCK_T, BLOCK_K], cast to the operand dtype (the torch path's Y is in that dtype too);
    accumulator [BLOCK_T, BLOCK_D] float32."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T))
    rmask = rows < T
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < D
    kk = tl.arange(0, BLOCK_K)
    op_ty = WU.dtype.element_ty
    NR = NADP * R
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, NR, BLOCK_K):
        ks = k0 + kk
        kmask = ks < NR
        m2 = rmask[:, None] & kmask[None, :]
        zg = tl.load(ZG + rows[:, None] * stride_zg + ks[None, :], mask=m2, other=0.0).to(tl.float32)
        pn = tl.load(P + rows[:, None] * stride_p + (ks // R)[None, :], mask=m2, other=0.0)
        if APPLY_ACT:
            zg = _act(zg, ACT)
        y = tl.where(m2, zg * pn, 0.0).to(op_ty)
        w = tl.load(WU + ks[:, None] * s_wu_c + dcols[None, :] * s_wu_k, mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = _mma(y, w, acc, IEEE)
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < NADP
    p = tl.load(P + rows[:, None] * stride_p + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
    bu = tl.load(BU + ns[:, None] * s_bu_n + dcols[None, :] * s_bu_k, mask=nmask[:, None] & dmask[None, :], other=0.0)
    acc = _mma(p.to(op_ty), bu, acc, IEEE)
    om = rmask[:, None] & dmask[None, :]
    if HAS_RES:
        acc += tl.load(RES + rows[:, None] * stride_res + dcols[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_out + dcols[None, :], acc.to(OUT.dtype.element_ty), mask=om)




# ---------------------------------------------------------------------------------------------
# 5. row op alone (afkern.ops.rowop semantics), forward and backward
# ---------------------------------------------------------------------------------------------
# Forward per token: G_n = act(Z_n); s_n = sum_j A_nj G_nj + sb_n; p = softmax(s M it); Y_n = p_n G_n
# Backward per token: g_n = sum_j dY_nj G_nj + dp_n;  ds_n = p_n (g_n - sum_m p_m g_m) it M_n
#                     dG_n = p_n dY_n + ds_n A_n;  dA_n = ds_n G_n;  dsb_n = ds_n;  dZ = dG act'(Z)
# A program owns BLOCK_T tokens and walks the N adapters twice (scores, then per-adapter outputs):
# the [BLOCK_T, N] scores live in registers, a [BLOCK_T, BLOCK_R] tile per adapter at a time.


@triton.jit
def _per_adapter_dots(U, stride_u, Z, stride_z, rows, jj, m2, ns, R, NADP, ACT: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_T, BLOCK_N] with column n = sum_j U_nj act(Z_nj) over adapter n's R columns: the
    scores (U = A) in the forward, g (U = dY) in the backward."""
    out = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for n in range(0, NADP):
        cols = n * R + jj
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        un = tl.sum(tl.where(m2, u * _act(z, ACT), 0.0), axis=1)
        out = tl.where(ns[None, :] == n, un[:, None], out)
    return out


@triton.jit
def _rowop_fwd_kernel(
    Z,  # [T, N*R] pre-activations
    A,  # [T, N*R] query pull-back
    SB,  # [T, N] score bias; unused unless HAS_SB
    M,  # [T, N] score-dropout scale; unused unless HAS_M
    Y,  # [T, N*R] output p_n G_n, Z's dtype
    P,  # [T, N] float32 output probabilities
    T,  # tokens
    R,  # bottleneck r
    NADP,  # adapters N
    stride_z, stride_a, stride_sb, stride_m, stride_y, stride_p,  # row strides
    inv_temperature,  # 1 / softmax temperature
    ACT: tl.constexpr,  # activation code
    HAS_SB: tl.constexpr,  # add SB
    HAS_M: tl.constexpr,  # multiply by M
    BLOCK_T: tl.constexpr,  # token tile
    BLOCK_R: tl.constexpr,  # next power of two >= R
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T))
    rmask = rows < T
    jj = tl.arange(0, BLOCK_R)
    jmask = jj < R
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < NADP
    m2 = rmask[:, None] & jmask[None, :]
    mn = rmask[:, None] & nmask[None, :]
    s = _per_adapter_dots(A, stride_a, Z, stride_z, rows, jj, m2, ns, R, NADP, ACT, BLOCK_T, BLOCK_N)
    if HAS_SB:
        s += tl.load(SB + rows[:, None] * stride_sb + ns[None, :], mask=mn, other=0.0).to(tl.float32)
    if HAS_M:
        s = s * tl.load(M + rows[:, None] * stride_m + ns[None, :], mask=mn, other=0.0).to(tl.float32)
    s = tl.where(nmask[None, :], s * inv_temperature, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(P + rows[:, None] * stride_p + ns[None, :], p, mask=mn)
    for n in range(0, NADP):
        cols = n * R + jj
        pn = tl.sum(tl.where(ns[None, :] == n, p, 0.0), axis=1)
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        y = _act(z, ACT) * pn[:, None]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m2)


@triton.jit
def _rowop_bwd_kernel(
    DY,  # [T, N*R] upstream gradient of Y
    DP,  # [T, N] upstream gradient of p; unused unless HAS_DP
    Z,  # [T, N*R] pre-activations
    A,  # [T, N*R] query pull-back
    P,  # [T, N] float32 probabilities from the forward
    M,  # [T, N] score-dropout scale (the SAME tensor the forward used); unused unless HAS_M
    DZ,  # [T, N*R] output, Z's dtype
    DA,  # [T, N*R] output, A's dtype
    DS,  # [T, N] float32 output: gradient of the scores (= of sb)
    Y,  # [T, N*R] output p_n G_n rebuilt for the up-projection's weight gradient; only if STORE_Y
    T,  # tokens
    R,  # bottleneck r
    NADP,  # adapters N
    stride_dy, stride_dp, stride_z, stride_a, stride_p, stride_m,  # row strides of the inputs
    stride_dz, stride_da, stride_ds, stride_y,  # row strides of the outputs
    inv_temperature,  # 1 / softmax temperature
    ACT: tl.constexpr,  # activation code
    HAS_DP: tl.constexpr,  # DP given
    HAS_M: tl.constexpr,  # M given
    STORE_Y: tl.constexpr,  # write Y
    BLOCK_T: tl.constexpr,  # token tile
    BLOCK_R: tl.constexpr,  # next power of two >= R
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T))
    rmask = rows < T
    jj = tl.arange(0, BLOCK_R)
    jmask = jj < R
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < NADP
    m2 = rmask[:, None] & jmask[None, :]
    mn = rmask[:, None] & nmask[None, :]
    g = _per_adapter_dots(DY, stride_dy, Z, stride_z, rows, jj, m2, ns, R, NADP, ACT, BLOCK_T, BLOCK_N)
    if HAS_DP:
        g += tl.load(DP + rows[:, None] * stride_dp + ns[None, :], mask=mn, other=0.0).to(tl.float32)
    p = tl.load(P + rows[:, None] * stride_p + ns[None, :], mask=mn, other=0.0)
    ds = p * (g - tl.sum(p * g, axis=1)[:, None]) * inv_temperature
    if HAS_M:
        ds = ds * tl.load(M + rows[:, None] * stride_m + ns[None, :], mask=mn, other=0.0).to(tl.float32)
    tl.store(DS + rows[:, None] * stride_ds + ns[None, :], ds, mask=mn)
    for n in range(0, NADP):
        cols = n * R + jj
        sel = ns[None, :] == n
        pn = tl.sum(tl.where(sel, p, 0.0), axis=1)[:, None]
        dsn = tl.sum(tl.where(sel, ds, 0.0), axis=1)[:, None]
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        gz = _act(z, ACT)
        dg = pn * dy + dsn * a
        tl.store(DA + rows[:, None] * stride_da + cols[None, :], (dsn * gz).to(DA.dtype.element_ty), mask=m2)
        tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], (dg * _act_grad(z, ACT)).to(DZ.dtype.element_ty), mask=m2)
        if STORE_Y:
            tl.store(Y + rows[:, None] * stride_y + cols[None, :], (pn * gz).to(Y.dtype.element_ty), mask=m2)


def rowop_blocks(r: int, n: int) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_R, BLOCK_N, num_warps) of the row-op kernels: about 2048 elements per
    [BLOCK_T, BLOCK_R] tile so five live tiles stay in registers at 4 warps."""
    BR = max(2, triton.next_power_of_2(r))
    BN = max(2, triton.next_power_of_2(n))
    BT = 4 if INTERPRET else max(1, min(64, 2048 // BR))
    return BT, BR, BN, 4


def _code(activation) -> int:
    return activation if isinstance(activation, int) else activation_code(activation)


def rowop_forward_triton(Z, A, sb, n_adapters, activation, inv_temperature=1.0, score_scale=None):
    """Triton ``afkern.ops.rowop.rowop_forward``: returns Y [T, N*r] (Z's dtype) and p [T, N] float32."""
    check_rowop_inputs(Z, A, sb, n_adapters)
    Z, A = Z.contiguous(), A.contiguous()
    T, W = Z.shape
    r = W // n_adapters
    Y = torch.empty_like(Z)
    P = torch.empty(T, n_adapters, dtype=torch.float32, device=Z.device)
    sb = sb.contiguous() if sb is not None else None
    M = score_scale.reshape(T, n_adapters).contiguous() if score_scale is not None else None
    BT, BR, BN, nw = rowop_blocks(r, n_adapters)
    if T:
        _rowop_fwd_kernel[(triton.cdiv(T, BT),)](
            Z, A, sb if sb is not None else P, M if M is not None else P, Y, P, T, r, n_adapters,
            Z.stride(0), A.stride(0), sb.stride(0) if sb is not None else 0, M.stride(0) if M is not None else 0,
            Y.stride(0), P.stride(0), float(inv_temperature),
            ACT=_code(activation), HAS_SB=sb is not None, HAS_M=M is not None,
            BLOCK_T=BT, BLOCK_R=BR, BLOCK_N=BN, num_warps=nw,
        )
    return Y, P


def rowop_backward_triton(dY, dp, Z, A, p, n_adapters, activation, inv_temperature=1.0, score_scale=None,
                          return_y=False):
    """Triton ``afkern.ops.rowop.rowop_backward``: returns dZ, dA (Z's/A's dtype), dsb [T, N] float32,
    and with ``return_y`` also Y = p G rebuilt (Z's dtype)."""
    Z, A, dY = Z.contiguous(), A.contiguous(), dY.contiguous()
    T, W = Z.shape
    r = W // n_adapters
    p = p.float().contiguous()
    dp = dp.contiguous() if dp is not None else None
    M = score_scale.reshape(T, n_adapters).contiguous() if score_scale is not None else None
    dZ = torch.empty_like(Z)
    dA = torch.empty_like(A)
    dS = torch.empty(T, n_adapters, dtype=torch.float32, device=Z.device)
    Y = torch.empty_like(Z) if return_y else dZ
    BT, BR, BN, nw = rowop_blocks(r, n_adapters)
    if T:
        _rowop_bwd_kernel[(triton.cdiv(T, BT),)](
            dY, dp if dp is not None else p, Z, A, p, M if M is not None else p, dZ, dA, dS, Y, T, r, n_adapters,
            dY.stride(0), dp.stride(0) if dp is not None else 0, Z.stride(0), A.stride(0), p.stride(0),
            M.stride(0) if M is not None else 0, dZ.stride(0), dA.stride(0), dS.stride(0), Y.stride(0),
            float(inv_temperature), ACT=_code(activation), HAS_DP=dp is not None, HAS_M=M is not None,
            STORE_Y=return_y, BLOCK_T=BT, BLOCK_R=BR, BLOCK_N=BN, num_warps=nw,
        )
    return (dZ, dA, dS, Y) if return_y else (dZ, dA, dS)


class RowOpTriton(torch.autograd.Function):
    """(Y, p) = rowop(Z, A, sb) with the Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx, Z, A, sb, n_adapters, activation, inv_temperature, score_scale):
        Y, P = rowop_forward_triton(Z, A, sb, n_adapters, activation, inv_temperature, score_scale)
        ctx.save_for_backward(Z, A, P, score_scale)
        ctx.cfg = (n_adapters, activation, inv_temperature, sb is not None, sb.dtype if sb is not None else None)
        return Y, P

    @staticmethod
    def backward(ctx, dY, dp):
        Z, A, P, M = ctx.saved_tensors
        n_adapters, activation, it, has_sb, sb_dtype = ctx.cfg
        if dY is None:
            dY = torch.zeros_like(Z)
        dZ, dA, dS = rowop_backward_triton(dY, dp, Z, A, P, n_adapters, activation, it, M)
        return dZ, dA, (dS.to(sb_dtype) if has_sb else None), None, None, None, None


def rowop_triton(Z, A, sb, n_adapters, activation, inv_temperature=1.0, score_scale=None):
    """Differentiable Triton row op with ``afkern.ops.fusion.rowop_autograd_torch``'s signature:
    pass as ``rowop=`` to ``fusion_layer_torch`` for the torch-GEMM + Triton-row-op fallback."""
    return RowOpTriton.apply(Z, A, sb, n_adapters, activation, inv_temperature, score_scale)


# ---------------------------------------------------------------------------------------------
# 6. the fused core: scores kernel -> softmax kernel -> mix kernel, with its backward
# ---------------------------------------------------------------------------------------------


def _launch_scores(x, q, Wd, bd, Wa, ba, Ws, bs, sc, N, r, act, store_a, store_g):
    T, D = x.shape
    S = torch.empty(T, N, dtype=torch.float32, device=x.device)
    ZG = torch.empty(T, N * r, dtype=x.dtype, device=x.device)
    A = torch.empty(T, N * r, dtype=x.dtype, device=x.device) if store_a else ZG
    BR = block_r(r)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), N)  # noqa: E731
    _tuned("scores", x.device, x.dtype == torch.float32)[grid](
        x, q, Wd, bd, Wa, ba if ba is not None else bd, Ws, bs if bs is not None else bd,
        sc if sc is not None else bd, S, ZG, A,
        T, D, r, x.stride(0), q.stride(0), Wd.stride(0), Wd.stride(1), Wa.stride(0), Wa.stride(1),
        Ws.stride(0), Ws.stride(1), S.stride(0), ZG.stride(0), A.stride(0),
        ACT=act, HAS_BA=ba is not None, HAS_BS=bs is not None, HAS_SC=sc is not None, STORE_A=store_a, STORE_G=store_g,
        IEEE=x.dtype == torch.float32, BLOCK_R=BR,
    )
    return S, ZG, (A if store_a else None)


def _launch_softmax(S, M, inv_temperature):
    T, N = S.shape
    P = torch.empty_like(S)
    BN = max(2, triton.next_power_of_2(N))
    BT = 16 if INTERPRET else max(1, min(128, 4096 // BN))
    _fusion_softmax_kernel[(triton.cdiv(T, BT),)](
        S, M if M is not None else S, P, T, N, S.stride(0), M.stride(0) if M is not None else 0, P.stride(0),
        float(inv_temperature), HAS_M=M is not None, BLOCK_T=BT, BLOCK_N=BN, num_warps=4,
    )
    return P


def _launch_mix(ZG, P, Wu, bu, residual, N, r, act, apply_act):
    T = ZG.shape[0]
    D = Wu.shape[1]
    out = torch.empty(T, D, dtype=ZG.dtype, device=ZG.device)
    res = residual if residual is not None else out
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _tuned("mix", ZG.device, ZG.dtype == torch.float32)[grid](
        ZG, P, Wu, bu, res, out, T, D, r, N, ZG.stride(0), P.stride(0), Wu.stride(0), Wu.stride(1),
        bu.stride(0), bu.stride(1), res.stride(0), out.stride(0),
        ACT=act, APPLY_ACT=apply_act, HAS_RES=residual is not None, IEEE=ZG.dtype == torch.float32,
        BLOCK_N=max(16, triton.next_power_of_2(N)),
    )
    return out


def _mm(a, b):
    return a @ b


class _FusionCoreTriton(torch.autograd.Function):
    """(mix, p) from x, q and the weights, all in canonical (possibly strided) layouts:
    Wd [d, N*r], bd [N*r], Wa [d, N*r], ba [N*r]|None, Ws [d, N], bs [N]|None, Wu [N*r, d],
    bu [N, d], residual [T, d]|None. mix = Y @ Wu + p @ bu (+ residual)."""

    @staticmethod
    def forward(ctx, x, q, Wd, bd, Wa, ba, Ws, bs, sc, Wu, bu, residual, M, N, r, act, it, need_grad):
        S, ZG, A = _launch_scores(x, q, Wd, bd, Wa, ba, Ws, bs, sc, N, r, act, store_a=need_grad, store_g=not need_grad)
        P = _launch_softmax(S, M, it)
        mix = _launch_mix(ZG, P, Wu, bu, residual, N, r, act, apply_act=need_grad)
        if need_grad:
            ctx.save_for_backward(x, q, Wd, Wa, Ws, Wu, bu, ZG, A, P, M)
        ctx.cfg = (N, r, act, it, need_grad, ba is not None, bs is not None, sc is not None, residual is not None)
        return mix, P

    @staticmethod
    def backward(ctx, dmix, dP):
        N, r, act, it, need_grad, has_ba, has_bs, has_sc, has_res = ctx.cfg
        if not need_grad:
            raise RuntimeError("afkern triton core: backward through a forward run without gradient tracking")
        x, q, Wd, Wa, Ws, Wu, bu, Z, A, P, M = ctx.saved_tensors
        ng = ctx.needs_input_grad
        dt = x.dtype
        dmix = dmix.contiguous() if dmix is not None else torch.zeros(x.shape, dtype=dt, device=x.device)
        # into the row op: dY = dmix Wu^T, dp = dmix bu^T (+ the probabilities' own gradient)
        dY = _mm(dmix, Wu.t())
        dp = _mm(dmix, bu.t()).float()
        if dP is not None:
            dp = dp + dP.float()
        want_y = ng[9]
        out = rowop_backward_triton(dY, dp, Z, A, P, N, act, it, M, return_y=want_y)
        dZ, dA, dS = out[:3]
        dSd = dS.to(dt)
        g = [None] * 18
        if ng[0]:
            g[0] = _mm(dZ, Wd.t())
        if ng[1]:
            g[1] = _mm(dA, Wa.t()) + _mm(dSd, Ws.t())
        if ng[2]:
            g[2] = _mm(x.t(), dZ)
        if ng[3]:
            g[3] = dZ.float().sum(0).to(dt)
        if ng[4]:
            g[4] = _mm(q.t(), dA)
        if ng[5] and has_ba:
            g[5] = dA.float().sum(0).to(dt)
        if ng[6]:
            g[6] = _mm(q.t(), dSd)
        if ng[7] and has_bs:
            g[7] = dS.sum(0).to(dt)
        if ng[8] and has_sc:
            g[8] = dS.sum(1).to(dt)
        if ng[9]:
            g[9] = _mm(out[3].t(), dmix)
        if ng[10]:
            g[10] = _mm(P.to(dt).t(), dmix)
        if ng[11] and has_res:
            g[11] = dmix
        return tuple(g)


def fusion_core_triton(x, q, Wd, bd, Wa, ba, Ws, bs, Wu, bu, residual, score_scale, N, r, activation,
                       inv_temperature=1.0, shared_score=None):
    """The fused N-wide part of a layer; see ``_FusionCoreTriton``. Returns (mix [T, d], p [T, N] f32).
    ``shared_score`` [T] or None is added to every adapter's score (it matters under score dropout)."""
    sc = shared_score
    tensors = (x, q, Wd, bd, Wa, ba, Ws, bs, sc, Wu, bu, residual)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    M = None
    if score_scale is not None:
        M = score_scale.reshape(x.shape[0], N).to(torch.float32).contiguous()
    return _FusionCoreTriton.apply(x, q, Wd, bd, Wa, ba, Ws, bs, sc, Wu, bu, residual, M, N, r,
                                   activation_code(activation), float(inv_temperature), need_grad)


# ---------------------------------------------------------------------------------------------
# 7. the layer
# ---------------------------------------------------------------------------------------------


def _check_inputs(h, input_tensor, P: FusionParams, spec: LayerSpec):
    for name, t in (("h", h), ("input_tensor", input_tensor)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != spec.hidden:
            raise ValueError(f"triton backend: {name} must be a 2-D tensor [T, {spec.hidden}], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if input_tensor.shape != h.shape:
        raise ValueError(f"triton backend: input_tensor {tuple(input_tensor.shape)} must match h {tuple(h.shape)}")
    if h.dtype not in _DTYPES or input_tensor.dtype != h.dtype:
        raise TypeError(f"triton backend supports float32, bfloat16 and float16 inputs of one dtype; got "
                        f"{h.dtype} and {input_tensor.dtype} (use backend='torch' for other dtypes)")
    if h.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"triton backend: tensors are on {h.device}; it runs on CUDA, or on CPU only with "
                           "TRITON_INTERPRET=1 set before triton is imported")
    N, r, d = P.down_weight.shape
    if h.shape[0] * max(d, 2 * N * r) > _MAX_ELEMS:
        raise ValueError(f"triton backend: {h.shape[0]} tokens x width {max(d, 2 * N * r)} exceeds the kernels' "
                         "int32 indexing (2**31 elements per tensor); split the batch")
    if (N, r, d) != (spec.n_adapters, spec.bottleneck, spec.hidden):
        raise ValueError(f"triton backend: down_weight is {(N, r, d)}, spec says "
                         f"{(spec.n_adapters, spec.bottleneck, spec.hidden)}")
    if N > 64:
        raise ValueError(f"triton backend supports at most 64 adapters per block, got {N}")


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def fusion_layer_triton(
    h: torch.Tensor,
    input_tensor: torch.Tensor,
    P: FusionParams,
    spec: LayerSpec,
    inv_temperature: float = 1.0,
    score_scale: Optional[torch.Tensor] = None,
    folded=None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One fused AdapterFusion block on 2-D inputs with Triton kernels.

    Args:
        h: [T, d] the wrapped module's ``dropout(dense(.))``; float32, bfloat16 or float16.
        input_tensor: [T, d] the block's residual input, same dtype.
        P, spec: the block's tensors and static description (``afkern.ops.params``).
        inv_temperature: 1 / softmax temperature.
        score_scale: [T, N] score-dropout scale (0 or 1/(1-p)) generated by the caller, or None;
            the backward reuses this same tensor.
        folded: ``FoldedWeights`` for inference, or None.

    Returns (out [T, d] in h's dtype, probs [T, N] float32, or None without fusion); the same
    values as ``afkern.ops.fusion.fusion_layer_torch``. Non-contiguous inputs are made contiguous.
    """
    _check_inputs(h, input_tensor, P, spec)
    dt = h.dtype
    h = h.contiguous()
    input_tensor = input_tensor.contiguous()
    N, r, d = P.down_weight.shape
    T = h.shape[0]
    if any(t is not None and t.dtype != dt for t in P.__dict__.values()):
        # autocast / mixed dtypes: differentiable casts, gradients still reach the parameters
        P = FusionParams(**{k: (None if v is None else v.to(dt)) for k, v in P.__dict__.items()})
    lnw, lnb = P.ln_weight, P.ln_bias

    if T == 0:
        from ..ops.fusion import fusion_layer_torch

        return fusion_layer_torch(h, input_tensor, P, spec, inv_temperature, score_scale, folded)

    # prologue (Adapter.pre_forward), with the Triton add + LayerNorm
    x, query, residual, _ = layer_prologue(h, input_tensor, P, spec, add_layer_norm_triton)

    if not spec.fusion:  # one adapter, no fusion: nothing N-wide to fuse, torch ops
        hidden = single_adapter_output(x, residual, P, spec)
        probs = None
    else:
        NR = N * r
        act = spec.activation
        if score_scale is not None:
            folded = None  # as the torch path: folded weights drop the score terms dropout keeps
        if folded is not None:
            w_in, b_in = _cast(folded.w_in, dt), _cast(folded.b_in, dt)
            if folded.w_q is None:
                Wd, bd = w_in[:, :NR], b_in[:NR]
                Wa, ba = w_in[:, NR:2 * NR], b_in[NR:2 * NR]
                Ws, bs = w_in[:, 2 * NR:], b_in[2 * NR:]
                q = x
            else:
                w_q, b_q = _cast(folded.w_q, dt), _cast(folded.b_q, dt)
                Wd, bd = w_in, b_in
                Wa, ba, Ws, bs = w_q[:, :NR], b_q[:NR], w_q[:, NR:], b_q[NR:]
                q = query
            w_out = _cast(folded.w_out, dt)
            Wu, bu = w_out[:NR], w_out[NR:]
            w_res = _cast(folded.w_res, dt)
            if spec.residual_before and w_res is not None:
                mix, probs = fusion_core_triton(x, q.contiguous(), Wd, bd, Wa, ba, Ws, bs, Wu, bu, None,
                                                score_scale, N, r, act, inv_temperature)
                hidden = torch.addmm(mix, residual, w_res)
            else:
                hidden, probs = fusion_core_triton(x, q.contiguous(), Wd, bd, Wa, ba, Ws, bs, Wu, bu, residual,
                                                   score_scale, N, r, act, inv_temperature)
        else:
            Wd_cat = P.down_weight.reshape(NR, d)
            Wu_cat = P.up_weight.reshape(NR, d)
            # q' = (query Wq^T + bq) Wk: two d x d GEMMs, left to cuBLAS
            qp = F.linear(query, P.query_weight, P.query_bias) if spec.query else query
            if spec.key:
                qp = qp @ P.key_weight
            qp = qp.contiguous()
            res_in = residual if (spec.residual_before or not spec.value) else None
            # under score dropout the per-token terms shared by all adapters no longer cancel
            sc = shared_score(query, qp, residual, P, spec) if score_scale is not None else None
            mix, probs = fusion_core_triton(
                x, qp, Wd_cat.t(), P.down_bias.reshape(NR), Wu_cat.t(), None, P.up_bias.t(), None,
                Wu_cat, P.up_bias, res_in, score_scale, N, r, act, inv_temperature, shared_score=sc,
            )
            if spec.value:
                # value map: a d x d GEMM (cuBLAS); the residual rides in addmm's C operand
                if spec.residual_before:
                    hidden = F.linear(mix, P.value_weight)
                else:
                    hidden = torch.addmm(residual, mix, P.value_weight.t())
            else:
                hidden = mix
    if spec.original_ln_after:
        hidden = add_layer_norm_triton(hidden, input_tensor, lnw, lnb, spec.ln_eps)
    return hidden, probs
