"""Residual add + LayerNorm in Triton: ``y = LayerNorm(x + residual)``, forward and backward (the
add + norm primitive of the triton backend; as Triton's 05-layer-norm tutorial, with the add fused).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import num_sms

__all__ = ["AddLayerNormTriton", "add_layer_norm_triton"]

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
    Y,  # [T, D] output, in the promoted dtype of X and RES (each summand is loaded in its own)
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
    DX,  # [T, D] output: gradient of both summands (Y's dtype)
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



class AddLayerNormTriton(torch.autograd.Function):
    """y = LayerNorm(x + residual) with Triton forward and backward (residual may be None).

    x and residual may differ in dtype (autocast: a 16-bit sub-layer output and the float32
    residual stream); y is in their promoted dtype, as ``x + residual`` in torch, and each
    summand's gradient in its own dtype."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        T, D = x.shape
        out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        y = torch.empty_like(x, dtype=out_dtype)
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
        dx = torch.empty_like(dy)
        progs = max(1, min(T, 4 * num_sms(x.device)))
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
        dres = dx.to(residual.dtype) if residual is not None and ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), dres, dw, db, None


def add_layer_norm_triton(x, residual, weight, bias, eps):
    """LayerNorm(x + residual) over the last dim of 2-D ``x``/``residual`` [T, d] (residual may be
    None): the triton backend's add + norm, ``afkern.ops.prologue.add_layer_norm_torch``'s signature."""
    if x.shape[0] == 0:
        return x + residual if residual is not None else x.clone()
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    return AddLayerNormTriton.apply(x, residual, weight, bias, eps)

