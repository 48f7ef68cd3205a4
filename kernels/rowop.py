"""The fusion row op alone in Triton (``afkern.ops.rowop`` is its contract), forward and backward.

These are the row op of the triton backend between torch GEMMs and the backward building block of
the fused core (``kernels/fusion_core.py``).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..ops.rowop import check_rowop_inputs
from .common import INTERPRET, act, act_code, act_grad

__all__ = ["rowop_forward_triton", "rowop_backward_triton", "rowop_triton", "RowOpTriton", "rowop_blocks", "prior_rows"]

# ---------------------------------------------------------------------------------------------
# Forward per token: G_n = act(Z_n); s_n = sum_j A_nj G_nj + sb_n; p = softmax(s M it + b); Y_n = p_n G_n
# Backward per token: g_n = sum_j dY_nj G_nj + dp_n;  ds_n = p_n (g_n - sum_m p_m g_m) it M_n
#                     dG_n = p_n dY_n + ds_n A_n;  dA_n = ds_n G_n;  dsb_n = ds_n;  dZ = dG act'(Z)
# A program owns BLOCK_T tokens and walks the N adapters twice (scores, then per-adapter outputs):
# the [BLOCK_T, N] scores live in registers, a [BLOCK_T, BLOCK_R] tile per adapter at a time.


@triton.jit
def _row_tile(T, R, NADP, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's token rows, one adapter's column offsets jj < R, the adapter offsets ns < N,
    and the masks of a [BLOCK_T, BLOCK_R] tile (m2) and of a [BLOCK_T, BLOCK_N] row of scores (mn)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    jj = tl.arange(0, BLOCK_R)
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < NADP
    return rows, jj, ns, nmask, rmask[:, None] & (jj < R)[None, :], rmask[:, None] & nmask[None, :]


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
        un = tl.sum(tl.where(m2, u * act(z, ACT), 0.0), axis=1)
        out = tl.where(ns[None, :] == n, un[:, None], out)
    return out


@triton.jit
def _rowop_fwd_kernel(
    Z,  # [T, N*R] pre-activations
    A,  # [T, N*R] query pull-back
    SB,  # [T, N] score bias; unused unless HAS_SB
    M,  # [T, N] score-dropout scale; unused unless HAS_M
    B,  # [T, N] prior added to the tempered scores (row stride 0: one [N] row); unused unless HAS_B
    Y,  # [T, N*R] output p_n G_n, Z's dtype
    P,  # [T, N] float32 output probabilities
    T,  # tokens
    R,  # bottleneck r
    NADP,  # adapters N
    stride_z, stride_a, stride_sb, stride_m, stride_b, stride_y, stride_p,  # row strides
    inv_temperature,  # 1 / softmax temperature
    ACT: tl.constexpr,  # activation code
    HAS_SB: tl.constexpr,  # add SB
    HAS_M: tl.constexpr,  # multiply by M
    HAS_B: tl.constexpr,  # add B after the temperature
    BLOCK_T: tl.constexpr,  # token tile
    BLOCK_R: tl.constexpr,  # next power of two >= R
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    rows, jj, ns, nmask, m2, mn = _row_tile(T, R, NADP, BLOCK_T, BLOCK_R, BLOCK_N)
    s = _per_adapter_dots(A, stride_a, Z, stride_z, rows, jj, m2, ns, R, NADP, ACT, BLOCK_T, BLOCK_N)
    if HAS_SB:
        s += tl.load(SB + rows[:, None] * stride_sb + ns[None, :], mask=mn, other=0.0).to(tl.float32)
    if HAS_M:
        s = s * tl.load(M + rows[:, None] * stride_m + ns[None, :], mask=mn, other=0.0).to(tl.float32)
    s = s * inv_temperature
    if HAS_B:
        s += tl.load(B + rows[:, None] * stride_b + ns[None, :], mask=mn, other=0.0).to(tl.float32)
    s = tl.where(nmask[None, :], s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(P + rows[:, None] * stride_p + ns[None, :], p, mask=mn)
    for n in range(0, NADP):
        cols = n * R + jj
        pn = tl.sum(tl.where(ns[None, :] == n, p, 0.0), axis=1)
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        y = act(z, ACT) * pn[:, None]
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
    rows, jj, ns, nmask, m2, mn = _row_tile(T, R, NADP, BLOCK_T, BLOCK_R, BLOCK_N)
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
        gz = act(z, ACT)
        dg = pn * dy + dsn * a
        tl.store(DA + rows[:, None] * stride_da + cols[None, :], (dsn * gz).to(DA.dtype.element_ty), mask=m2)
        tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], (dg * act_grad(z, ACT)).to(DZ.dtype.element_ty), mask=m2)
        if STORE_Y:
            tl.store(Y + rows[:, None] * stride_y + cols[None, :], (pn * gz).to(Y.dtype.element_ty), mask=m2)


def rowop_blocks(r: int, n: int) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_R, BLOCK_N, num_warps) of the row-op kernels: about 2048 elements per
    [BLOCK_T, BLOCK_R] tile so five live tiles stay in registers at 4 warps."""
    BR = max(2, triton.next_power_of_2(r))
    BN = max(2, triton.next_power_of_2(n))
    BT = 4 if INTERPRET else max(1, min(64, 2048 // BR))
    return BT, BR, BN, 4


def prior_rows(prior, T: int, N: int):
    """The prior as float32 rows [T, N], broadcast ([N]: row stride 0, no copy), or None."""
    if prior is None:
        return None
    prior = prior.to(torch.float32)
    return prior.expand(T, N) if prior.dim() == 1 else prior.contiguous()


def rowop_forward_triton(Z, A, sb, n_adapters, activation, inv_temperature=1.0, score_scale=None, prior=None):
    """Triton ``afkern.ops.rowop.rowop_forward``: returns Y [T, N*r] (Z's dtype) and p [T, N] float32."""
    check_rowop_inputs(Z, A, sb, n_adapters, prior)
    Z, A = Z.contiguous(), A.contiguous()
    T, W = Z.shape
    r = W // n_adapters
    Y = torch.empty_like(Z)
    P = torch.empty(T, n_adapters, dtype=torch.float32, device=Z.device)
    sb = sb.contiguous() if sb is not None else None
    M = score_scale.reshape(T, n_adapters).contiguous() if score_scale is not None else None
    B = prior_rows(prior, T, n_adapters)
    BT, BR, BN, nw = rowop_blocks(r, n_adapters)
    if T:
        _rowop_fwd_kernel[(triton.cdiv(T, BT),)](
            Z, A, sb if sb is not None else P, M if M is not None else P, B if B is not None else P, Y, P,
            T, r, n_adapters, Z.stride(0), A.stride(0), sb.stride(0) if sb is not None else 0,
            M.stride(0) if M is not None else 0, B.stride(0) if B is not None else 0,
            Y.stride(0), P.stride(0), float(inv_temperature),
            ACT=act_code(activation), HAS_SB=sb is not None, HAS_M=M is not None, HAS_B=B is not None,
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
            float(inv_temperature), ACT=act_code(activation), HAS_DP=dp is not None, HAS_M=M is not None,
            STORE_Y=return_y, BLOCK_T=BT, BLOCK_R=BR, BLOCK_N=BN, num_warps=nw,
        )
    return (dZ, dA, dS, Y) if return_y else (dZ, dA, dS)


class RowOpTriton(torch.autograd.Function):
    """(Y, p) = rowop(Z, A, sb) with the Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx, Z, A, sb, n_adapters, activation, inv_temperature, score_scale, prior):
        Y, P = rowop_forward_triton(Z, A, sb, n_adapters, activation, inv_temperature, score_scale, prior)
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
        return dZ, dA, (dS.to(sb_dtype) if has_sb else None), None, None, None, None, None


def rowop_triton(Z, A, sb, n_adapters, activation, inv_temperature=1.0, score_scale=None, prior=None):
    """Differentiable Triton row op with ``afkern.ops.rowop.rowop_torch``'s signature (a
    ``Primitives.rowop``: the triton backend's row op between torch GEMMs)."""
    return RowOpTriton.apply(Z, A, sb, n_adapters, activation, inv_temperature, score_scale, prior)
