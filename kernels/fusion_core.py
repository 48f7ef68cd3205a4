"""The fused core of the triton backend: scores kernel -> softmax kernel -> mix kernel, with its
backward (docs/DESIGN.md section 4, ``afkern.ops.layer`` for the canonical weight layouts).

Notation, per token t (rows), adapter n, bottleneck column j < r, hidden column k < d:

    x      [T, d]      adapter input (LayerNorm(h + input_tensor) in the Pfeiffer placement)
    q      [T, d]      query-side input: q' = (query Wq^T + bq) Wk unfolded, x or query folded
    Z_n    [T, r]      = x Wd_n + bd_n                         (down-projection, pre-activation)
    A_n    [T, r]      = q Wa_n + ba_n                         (Wa_n = Wu_n^T unfolded, ba = 0)
    sb_n   [T]         = q . ws_n + bs_n (+ shared)            (ws_n = bu_n unfolded, bs = 0)
    G_n               = act(Z_n)
    s_n               = sum_j A_nj G_nj + sb_n                  (score, up to a constant over n)
    p                 = softmax_n(s * M * inv_temperature + b)  (M: score-dropout scale or 1;
                                                                 b: the prior, 0 if none)
    mix    [T, d]      = [p_1 G_1 | ... | p_N G_N] @ Wu_cat + p @ bu (+ residual)

Kernels (one program = one tile; shapes of each tile are in the kernel docstrings):

- ``_fusion_scores_kernel_impl``: a program owns BLOCK_T tokens and ONE adapter n; it runs both
  GEMMs over d (``x Wd_n`` and ``q Wa_n``) with ``tl.dot``, applies the bias and the activation in
  registers and reduces the score s_n. It writes s [T, N] and Z (training) or G (inference),
  plus A when a backward will need it; never an [N, T, d] tensor.
- ``_fusion_softmax_kernel``: p = softmax over N of s * M * inv_temperature + b, [T, N] float32.
- ``_fusion_mix_kernel_impl``: the p-scaled up-projection as one GEMM over K = N*r whose prologue
  forms p_n * act(Z_n) tile by tile, then ``p @ bu`` (a second small ``tl.dot``) and the residual
  in the epilogue. With folded inference weights the same kernel reads ``w_out`` (Wu_cat Wv^T).

Backward (``_FusionCoreTriton``): the weight and input gradients are plain GEMMs left to cuBLAS
(see docs/KERNELS_TRITON.md for why); the N-wide row work is the Triton row-op backward kernel
(``kernels/rowop.py``), which also rebuilds Y = p G for dWu so Y is never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, act, act_code, arch as device_arch, mma
from . import tuned
from .rowop import prior_rows, rowop_backward_triton

__all__ = ["fusion_core_triton", "scores_configs", "mix_configs", "block_r"]

_MAX_BLOCK_R = 64  # cap on the r-tile of the scores kernel: larger r loops over r-tiles


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
# The routed inference form (HAS_SEG: a loop over the segments a tile overlaps around the body)
# holds a few more registers: its own lists, each entry spill-free on sm_80 and sm_90 under triton
# 3.6 and 3.8 (tests/test_triton_compile.py, scripts/test_triton36.sh).
_SCORES_F32_SEG = [(32, 32, 8, 1), (32, 16, 8, 1)]
_MIX_BF16_SEG = [(32, 32, 32, 4, 2), (64, 64, 64, 4, 3), (64, 32, 128, 8, 3), (64, 64, 128, 8, 3)]
_MIX_F32_SEG = [(16, 32, 32, 4, 2), (32, 32, 32, 8, 1)]


def scores_configs(arch: int, fp32: bool = False, seg: bool = False):
    """Autotune configs of the scores kernel on sm_<arch> (80, 90, ...), of its routed inference
    form with ``seg``; one small config when interpreting."""
    if INTERPRET:
        return [_cfg(16, 64, 4, 1)]
    if fp32:
        rows = _SCORES_F32_SEG if seg else _SCORES_F32
    else:
        rows = _SCORES_BF16 + (_SCORES_BF16_SM90 if arch >= 90 else [])
    return [_cfg(*c) for c in rows]


def mix_configs(arch: int, fp32: bool = False, seg: bool = False):
    """Autotune configs of the mix kernel on sm_<arch> (``seg``: its routed inference form); one
    small config when interpreting."""
    if INTERPRET:
        return [_cfg(16, 64, 4, 1, BLOCK_D=64)]
    if seg:
        rows = _MIX_F32_SEG if fp32 else _MIX_BF16_SEG
    else:
        rows = _MIX_F32 if fp32 else _MIX_BF16
    return [_cfg(bt, bk, w, s, BLOCK_D=bd) for bt, bk, bd, w, s in rows]




def block_r(r: int) -> int:
    """The r-tile of the scores kernel: r padded to a power of two >= 16 (tl.dot minimum), capped
    at 64; a larger r is covered by a loop over r-tiles inside the program."""
    return min(_MAX_BLOCK_R, max(16, triton.next_power_of_2(r)))


@triton.jit
def _tile_segments(SEG, rows, rmask, pid_t, T, HAS_SEG: tl.constexpr, BLOCK_T: tl.constexpr):
    """(segment of each row of the tile, first segment, one past the last) of a token tile whose
    rows are sorted by segment; without segments one segment 0 over every row."""
    if HAS_SEG:
        rseg = tl.load(SEG + rows, mask=rmask, other=-1)
        g_lo = tl.load(SEG + pid_t * BLOCK_T)
        g_hi = tl.load(SEG + tl.minimum(pid_t * BLOCK_T + BLOCK_T, T) - 1) + 1
    else:
        rseg = tl.zeros([BLOCK_T], dtype=tl.int32)
        g_lo = 0
        g_hi = 1
    return rseg, g_lo, g_hi


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
    SEG,  # [T] int32 segment of each row (rows sorted by segment); unused unless HAS_SEG
    WOFF,  # [S] int64: segment g's WA / WS are at WA + WOFF[g], WS + WOFF[g]; unused unless HAS_SEG
    BOFF,  # [S] int64: segment g's BA / BS are at BA + BOFF[g], BS + BOFF[g]; unused unless HAS_SEG
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
    HAS_SEG: tl.constexpr,  # a routed batch: WA, BA, WS, BS are per segment (folded inference maps)
    IEEE: tl.constexpr,  # float32 operands: exact-product dots
    BLOCK_T: tl.constexpr,  # token tile (autotuned)
    BLOCK_R: tl.constexpr,  # r tile (>= 16, power of two; host: block_r(R))
    BLOCK_K: tl.constexpr,  # reduction tile over d (autotuned)
):
    """Grid (cdiv(T, BLOCK_T), N). Tiles: x, q [BLOCK_T, BLOCK_K]; Wd_n, Wa_n [BLOCK_K, BLOCK_R];
    accumulators Z, A [BLOCK_T, BLOCK_R] float32; s [BLOCK_T] float32.

    Segments (HAS_SEG, a routed batch of folded fusions): the rows are sorted by segment, and
    segment g reads its own maps at element offsets WOFF[g] / BOFF[g] (views of one stack of
    folds, so no copy); Wd is the block's, shared.
    A program loops over the segments its tile overlaps (one, except at a boundary); each pass
    computes the tile with one segment's maps and stores that segment's rows only: a tile on a
    boundary costs one pass per segment in it, the rest cost what the unsegmented kernel does."""
    pid_t = tl.program_id(0)
    n = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T))
    rmask = rows < T
    kk = tl.arange(0, BLOCK_K)
    jj = tl.arange(0, BLOCK_R)
    rseg, g_lo, g_hi = _tile_segments(SEG, rows, rmask, pid_t, T, HAS_SEG, BLOCK_T)
    for g in range(g_lo, g_hi):
        if HAS_SEG:
            wo = tl.load(WOFF + g)
            bo = tl.load(BOFF + g)
        else:
            wo = 0
            bo = 0
        _scores_segment(X, Q, WD, BD, WA + wo, BA + bo, WS + wo, BS + bo, SC, S, ZG, A, rows,
                        rmask & (rseg == g), n, kk, jj, D, R, stride_x, stride_q, stride_s,
                        s_wd_k, s_wd_c, s_wa_k, s_wa_c, s_ws_k, s_ws_n, stride_zg, stride_a,
                        ACT, HAS_BA, HAS_BS, HAS_SC, STORE_A, STORE_G, IEEE, BLOCK_T, BLOCK_R, BLOCK_K)


@triton.jit
def _scores_segment(X, Q, WD, BD, WA, BA, WS, BS, SC, S, ZG, A, rows, rmask, n, kk, jj, D, R, stride_x, stride_q,
                    stride_s,
                    s_wd_k, s_wd_c, s_wa_k, s_wa_c, s_ws_k, s_ws_n, stride_zg, stride_a,
                    ACT: tl.constexpr, HAS_BA: tl.constexpr, HAS_BS: tl.constexpr, HAS_SC: tl.constexpr,
                    STORE_A: tl.constexpr, STORE_G: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """The scores kernel's body for the rows ``rmask`` selects (one segment's, or all): writes
    their scores, their Z or G (and A); nothing is carried from one segment to the next."""
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
            accz = mma(x, wd, accz, IEEE)
            acca = mma(q, wa, acca, IEEE)
        accz += tl.load(BD + cols, mask=jmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BA:
            acca += tl.load(BA + cols, mask=jmask, other=0.0).to(tl.float32)[None, :]
        # round to the storage dtype first so the score, the mix and the backward all see the
        # same Z and A (the torch path holds them in the input dtype too)
        z = accz.to(out_ty)
        a = acca.to(out_ty)
        g = act(z.to(tl.float32), ACT)
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
# Autotune keys. The inference and training forms of a kernel (STORE_G / APPLY_ACT) are tuned
# apart; a config measured on a GPU for a key (kernels/tuned.py, kernels/tuned_configs.json) is
# used without benchmarking.
AUTOTUNE_KEYS = {"scores": ["D", "R", "BLOCK_R", "STORE_G"], "mix": ["D", "R", "NADP", "APPLY_ACT"]}


def _tuned(which: str, device: torch.device, fp32: bool, seg: bool = False):
    """The autotuned launcher of a GEMM kernel for a device's architecture and operand precision
    (``seg``: its routed inference form, tuned apart with its own candidates)."""
    arch = device_arch(device)
    key = (which, arch, fp32, seg)
    if key not in _TUNED:
        configs, fn, dtype_arg = ((scores_configs(arch, fp32, seg), _fusion_scores_kernel_impl, "X")
                                  if which == "scores" else (mix_configs(arch, fp32, seg), _fusion_mix_kernel_impl, "ZG"))
        name = which + ("_seg" if seg else "")
        prune = {"early_config_prune": tuned.prune_fn(name, arch, AUTOTUNE_KEYS[which], dtype_arg)}
        _TUNED[key] = triton.autotune(configs=configs, key=AUTOTUNE_KEYS[which], prune_configs_by=prune)(fn)
    return _TUNED[key]


# ---------------------------------------------------------------------------------------------
# 3. softmax over adapters
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fusion_softmax_kernel(
    S,  # [T, N] float32 scores
    M,  # [T, N] score-dropout scale (0 or 1/(1-p)); unused unless HAS_M
    B,  # [T, N] prior added after the temperature (row stride 0: one [N] row); unused unless HAS_B
    P,  # [T, N] float32 output probabilities
    T,  # tokens
    NADP,  # adapters N
    stride_s, stride_m, stride_b, stride_p,  # row strides
    inv_temperature,  # 1 / softmax temperature
    HAS_M: tl.constexpr,  # apply M
    HAS_B: tl.constexpr,  # add B
    BLOCK_T: tl.constexpr,  # token tile
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    """p = softmax_n(s * M * inv_temperature + b); grid (cdiv(T, BLOCK_T),)."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T))
    ns = tl.arange(0, BLOCK_N)
    m2 = (rows < T)[:, None] & (ns < NADP)[None, :]
    s = tl.load(S + rows[:, None] * stride_s + ns[None, :], mask=m2, other=0.0)
    if HAS_M:
        s = s * tl.load(M + rows[:, None] * stride_m + ns[None, :], mask=m2, other=0.0).to(tl.float32)
    s = s * inv_temperature
    if HAS_B:
        s += tl.load(B + rows[:, None] * stride_b + ns[None, :], mask=m2, other=0.0).to(tl.float32)
    s = tl.where((ns < NADP)[None, :], s, float("-inf"))
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
    OUT,  # [T, D] output: ZG's dtype, or RES's where that is wider (the float32 stream under autocast)
    SEG,  # [T] int32 segment of each row (rows sorted by segment); unused unless HAS_SEG
    WOFF,  # [S] int64: segment g's WU / BU are at WU + WOFF[g], BU + WOFF[g]; unused unless HAS_SEG
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
    HAS_SEG: tl.constexpr,  # a routed batch: WU, BU are per segment (folded inference maps)
    IEEE: tl.constexpr,  # float32 operands: exact-product dots
    BLOCK_N: tl.constexpr,  # next power of two >= max(N, 16)
    BLOCK_T: tl.constexpr,  # token tile (autotuned)
    BLOCK_D: tl.constexpr,  # output-column tile (autotuned)
    BLOCK_K: tl.constexpr,  # reduction tile over N*R (autotuned)
):
    """Grid (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D)). Prologue tile Y = p[t, c // R] * act(Z[t, c]),
    [BLOCK_T, BLOCK_K], cast to the operand dtype (the torch path's Y is in that dtype too);
    accumulator [BLOCK_T, BLOCK_D] float32. Segments (HAS_SEG): segment g reads WU + WOFF[g]
    and BU + WOFF[g] (Wu and bu are row blocks of one folded w_out), a tile looping over the
    segments it overlaps (the scores kernel's rule)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T))
    rmask = rows < T
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < D
    rseg, g_lo, g_hi = _tile_segments(SEG, rows, rmask, pid_t, T, HAS_SEG, BLOCK_T)
    for g in range(g_lo, g_hi):
        if HAS_SEG:
            wo = tl.load(WOFF + g)
        else:
            wo = 0
        _mix_segment(ZG, P, WU + wo, BU + wo, RES, OUT, rows, rmask & (rseg == g), dcols, dmask, R, NADP, stride_zg,
                     stride_p, s_wu_c, s_wu_k, s_bu_n, s_bu_k, stride_res, stride_out, ACT, APPLY_ACT, HAS_RES, IEEE,
                     BLOCK_N, BLOCK_T, BLOCK_D, BLOCK_K)


@triton.jit
def _mix_segment(ZG, P, WU, BU, RES, OUT, rows, rmask, dcols, dmask, R, NADP, stride_zg, stride_p, s_wu_c, s_wu_k,
                 s_bu_n, s_bu_k, stride_res, stride_out, ACT: tl.constexpr, APPLY_ACT: tl.constexpr,
                 HAS_RES: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """The mix tile of the rows ``rmask`` selects (one segment's, or all) with the maps WU, BU:
    Y @ Wu + p @ bu (+ residual), stored; nothing is carried from one segment to the next."""
    op_ty = WU.dtype.element_ty
    kk = tl.arange(0, BLOCK_K)
    NR = NADP * R
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, NR, BLOCK_K):
        ks = k0 + kk
        kmask = ks < NR
        m2 = rmask[:, None] & kmask[None, :]
        zg = tl.load(ZG + rows[:, None] * stride_zg + ks[None, :], mask=m2, other=0.0).to(tl.float32)
        pn = tl.load(P + rows[:, None] * stride_p + (ks // R)[None, :], mask=m2, other=0.0)
        if APPLY_ACT:
            zg = act(zg, ACT)
        y = tl.where(m2, zg * pn, 0.0).to(op_ty)
        w = tl.load(WU + ks[:, None] * s_wu_c + dcols[None, :] * s_wu_k, mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = mma(y, w, acc, IEEE)
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < NADP
    p = tl.load(P + rows[:, None] * stride_p + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
    bu = tl.load(BU + ns[:, None] * s_bu_n + dcols[None, :] * s_bu_k, mask=nmask[:, None] & dmask[None, :], other=0.0)
    acc = mma(p.to(op_ty), bu, acc, IEEE)
    om = rmask[:, None] & dmask[None, :]
    if HAS_RES:
        acc += tl.load(RES + rows[:, None] * stride_res + dcols[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_out + dcols[None, :], acc.to(OUT.dtype.element_ty), mask=om)


# ---------------------------------------------------------------------------------------------
# 5. the fused core: scores kernel -> softmax kernel -> mix kernel, with its backward
# ---------------------------------------------------------------------------------------------


def _launch_scores(x, q, Wd, bd, Wa, ba, Ws, bs, sc, N, r, act, store_a, store_g, seg=None):
    """``seg``: None, or (rows' segment ids int32 [T], weight offsets int64 [S], bias offsets
    int64 [S]) with Wa .. bs segment 0's maps (``SegmentedWeights``)."""
    T, D = x.shape
    S = torch.empty(T, N, dtype=torch.float32, device=x.device)
    ZG = torch.empty(T, N * r, dtype=x.dtype, device=x.device)
    A = torch.empty(T, N * r, dtype=x.dtype, device=x.device) if store_a else ZG
    BR = block_r(r)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), N)  # noqa: E731
    _tuned("scores", x.device, x.dtype == torch.float32, seg is not None)[grid](
        x, q, Wd, bd, Wa, ba if ba is not None else bd, Ws, bs if bs is not None else bd,
        sc if sc is not None else bd, S, ZG, A, *(seg if seg is not None else (S, S, S)),
        T, D, r, x.stride(0), q.stride(0), Wd.stride(0), Wd.stride(1), Wa.stride(0), Wa.stride(1),
        Ws.stride(0), Ws.stride(1), S.stride(0), ZG.stride(0), A.stride(0),
        ACT=act, HAS_BA=ba is not None, HAS_BS=bs is not None, HAS_SC=sc is not None, STORE_A=store_a, STORE_G=store_g,
        HAS_SEG=seg is not None, IEEE=x.dtype == torch.float32, BLOCK_R=BR,
    )
    return S, ZG, (A if store_a else None)


def _launch_softmax(S, M, B, inv_temperature):
    T, N = S.shape
    P = torch.empty_like(S)
    BN = max(2, triton.next_power_of_2(N))
    BT = 16 if INTERPRET else max(1, min(128, 4096 // BN))
    _fusion_softmax_kernel[(triton.cdiv(T, BT),)](
        S, M if M is not None else S, B if B is not None else S, P, T, N, S.stride(0),
        M.stride(0) if M is not None else 0, B.stride(0) if B is not None else 0, P.stride(0),
        float(inv_temperature), HAS_M=M is not None, HAS_B=B is not None, BLOCK_T=BT, BLOCK_N=BN, num_warps=4,
    )
    return P


def _launch_mix(ZG, P, Wu, bu, residual, N, r, act, apply_act, seg=None):
    """``seg``: None, or (rows' segment ids int32 [T], w_out offsets int64 [S]) with Wu, bu
    segment 0's maps."""
    T = ZG.shape[0]
    D = Wu.shape[1]
    # a float32 residual (autocast's residual stream) is added unrounded and kept float32
    out_dtype = ZG.dtype if residual is None else torch.promote_types(ZG.dtype, residual.dtype)
    out = torch.empty(T, D, dtype=out_dtype, device=ZG.device)
    res = residual if residual is not None else out
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _tuned("mix", ZG.device, ZG.dtype == torch.float32, seg is not None)[grid](
        ZG, P, Wu, bu, res, out, *(seg if seg is not None else (P, P)), T, D, r, N, ZG.stride(0), P.stride(0),
        Wu.stride(0), Wu.stride(1), bu.stride(0), bu.stride(1), res.stride(0), out.stride(0),
        ACT=act, APPLY_ACT=apply_act, HAS_RES=residual is not None, HAS_SEG=seg is not None,
        IEEE=ZG.dtype == torch.float32,
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
    def forward(ctx, x, q, Wd, bd, Wa, ba, Ws, bs, sc, Wu, bu, residual, M, B, N, r, act, it, need_grad):
        S, ZG, A = _launch_scores(x, q, Wd, bd, Wa, ba, Ws, bs, sc, N, r, act, store_a=need_grad, store_g=not need_grad)
        P = _launch_softmax(S, M, B, it)
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
        dres = dmix  # in the residual's dtype (the mix is in it when it is wider than dt)
        dmix = dmix.to(dt).contiguous() if dmix is not None else torch.zeros(x.shape, dtype=dt, device=x.device)
        # into the row op: dY = dmix Wu^T, dp = dmix bu^T (+ the probabilities' own gradient)
        dY = _mm(dmix, Wu.t())
        dp = _mm(dmix, bu.t()).float()
        if dP is not None:
            dp = dp + dP.float()
        want_y = ng[9]
        out = rowop_backward_triton(dY, dp, Z, A, P, N, act, it, M, return_y=want_y)
        dZ, dA, dS = out[:3]
        dSd = dS.to(dt)
        g = [None] * 19
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
            g[11] = dres
        return tuple(g)


def fusion_core_triton(x, q, W, shared, residual, score_scale, prior, N, r, activation, inv_temperature=1.0):
    """The fused N-wide core of a layer (a ``Primitives.core``, see ``afkern.ops.layer``).

    x, q [T, d]; W: ``afkern.ops.layer.CoreWeights`` (canonical, possibly strided layouts);
    shared [T] or None: a score term added for every adapter (it matters under score dropout);
    residual [T, d] or None: added to the mix; score_scale [T, N] or None; prior [N] or [T, N] or
    None. Returns (mix [T, d] in x's dtype, or the residual's where that is wider, p [T, N] float32)."""
    T = x.shape[0]
    if T == 0:  # no program to launch
        return x.new_zeros(0, W.Wu.shape[1]), x.new_zeros(0, N, dtype=torch.float32)
    tensors = (x, q, W.Wd, W.bd, W.Wa, W.ba, W.Ws, W.bs, shared, W.Wu, W.bu, residual)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    M = None
    if score_scale is not None:
        M = score_scale.reshape(T, N).to(torch.float32).contiguous()
    if W.seg is not None:  # a routed batch of folded fusions: inference only (folds carry no gradient)
        if need_grad:
            raise RuntimeError("afkern triton core: per-segment folded maps are inference weights; a forward that "
                               "needs gradients runs unfolded")
        rows, w_off, b_off, out_off = W.seg
        S, G, _ = _launch_scores(x, q, W.Wd, W.bd, W.Wa, W.ba, W.Ws, W.bs, shared, N, r, act_code(activation),
                                 store_a=False, store_g=True, seg=(rows, w_off, b_off))
        P = _launch_softmax(S, M, prior_rows(prior, T, N), float(inv_temperature))
        return _launch_mix(G, P, W.Wu, W.bu, residual, N, r, act_code(activation), apply_act=False,
                           seg=(rows, out_off)), P
    return _FusionCoreTriton.apply(*tensors, M, prior_rows(prior, T, N), N, r, act_code(activation),
                                   float(inv_temperature), need_grad)

