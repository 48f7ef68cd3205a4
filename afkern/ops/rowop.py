"""The fusion row op: the only N-wide, non-GEMM work of a re-associated fusion layer.

Math (docs/DESIGN.md section 3), per token t, adapters n = 1..N, bottleneck r:

    Z   [T, N*r]  = x @ Wd_cat^T + bd            (pre-activation of all N down-projections)
    A   [T, N*r]  = q' @ Wu_cat^T                 (query pulled back through each up-projection)
    sb  [T, N]    = q' @ bu^T (+ shared term)     (query . up-projection bias), optional; under
                                                  score dropout it also carries the terms equal
                                                  for all adapters (q . bk, ...), which then matter
    G_n           = act(Z_n)
    s_n           = sum_r A_nr G_nr + sb_n        (== q' . up_n up to a constant over n)
    s~            = s * M                         (M: score-dropout scale, 0 or 1/(1-p); 1 if none)
    p             = softmax(s~ * inv_temperature + b) over n
                                                  (b: the prior, [T, N] or [N]: 0 everywhere for a
                                                  plain fusion, -inf for an adapter a control zeroes
                                                  or a routed fusion leaves out; with
                                                  inv_temperature = 0 it fixes p = softmax(b))
    Y_n           = p_n G_n                       (so sum_n p_n up_n = Y @ Wu_cat + p @ bu)

Backward, from upstream dY [T, N*r] and dp [T, N] (b is a constant: it does not appear):

    g_n   = sum_r dY_nr G_nr + dp_n
    ds_n  = p_n (g_n - sum_m p_m g_m) * inv_temperature * M_n
    dG_n  = p_n dY_n + ds_n A_n
    dA_n  = ds_n G_n
    dsb_n = ds_n
    dZ    = dG * act'(Z)

Scores, softmax and the backward accumulate in float32 whatever the storage dtype (float64 for
float64). This file holds the plain-torch statement of that contract (:func:`rowop_forward`,
:func:`rowop_backward`: the oracle of the kernels' row ops) and the torch backend's row op
(:func:`rowop_torch`, autograd-derived). The Triton kernels (``kernels/rowop.py``) and the CUDA
ops (``csrc/rowop.cu``) are tested against the contract, and it against autograd.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .activations import activation_fn, activation_grad

__all__ = ["rowop_forward", "rowop_backward", "rowop_torch", "acc", "check_rowop_inputs"]


def acc(t: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype: float32 for 16/32-bit inputs, float64 stays float64."""
    return t if t.dtype in (torch.float64, torch.float32) else t.float()


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is already ``dtype`` (a decoding step's single
    token pays for every call)."""
    return t if t.dtype == dtype else t.to(dtype)


def check_rowop_inputs(Z: torch.Tensor, A: torch.Tensor, sb: Optional[torch.Tensor], n_adapters: int,
                       prior: Optional[torch.Tensor] = None):
    """Shape checks every row-op implementation shares."""
    if Z.dim() != 2 or A.shape != Z.shape:
        raise ValueError(f"rowop expects Z and A of the same shape [T, N*r], got {tuple(Z.shape)} and {tuple(A.shape)}")
    if n_adapters < 1 or Z.shape[1] % n_adapters:
        raise ValueError(f"rowop: width {Z.shape[1]} is not a multiple of the adapter count {n_adapters}")
    if sb is not None and sb.shape != (Z.shape[0], n_adapters):
        raise ValueError(f"rowop expects sb of shape [T, N] = {(Z.shape[0], n_adapters)}, got {tuple(sb.shape)}")
    if prior is not None and prior.shape not in ((n_adapters,), (Z.shape[0], n_adapters)):
        raise ValueError(f"rowop expects a prior of shape [N] or [T, N] = {(Z.shape[0], n_adapters)}, "
                         f"got {tuple(prior.shape)}")


def _tempered(s: torch.Tensor, inv_temperature: float, score_scale, prior) -> torch.Tensor:
    """``s * M * inv_temperature + b`` in the accumulation dtype."""
    if score_scale is not None:
        s = s * score_scale.to(s.dtype)
    if inv_temperature != 1.0:  # (a decoding step's single token pays for every small op)
        s = s * inv_temperature
    if prior is not None:
        s = s + prior.to(s.dtype)
    return s


def rowop_forward(
    Z: torch.Tensor,
    A: torch.Tensor,
    sb: Optional[torch.Tensor],
    n_adapters: int,
    activation: str,
    inv_temperature: float = 1.0,
    score_scale: Optional[torch.Tensor] = None,
    prior: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of the row op. Returns ``Y`` [T, N*r] in Z's dtype and ``p`` [T, N] in the
    accumulation dtype (float32; float64 for float64 inputs)."""
    check_rowop_inputs(Z, A, sb, n_adapters, prior)
    T, W = Z.shape
    r = W // n_adapters
    G = activation_fn(activation)(acc(Z)).view(T, n_adapters, r)
    s = (acc(A).view(T, n_adapters, r) * G).sum(-1)
    if sb is not None:
        s = s + acc(sb)
    p = torch.softmax(_tempered(s, inv_temperature, score_scale, prior), dim=-1)
    Y = (G * p.unsqueeze(-1)).view(T, W)
    return Y.to(Z.dtype), p


def rowop_backward(
    dY: torch.Tensor,
    dp: Optional[torch.Tensor],
    Z: torch.Tensor,
    A: torch.Tensor,
    p: torch.Tensor,
    n_adapters: int,
    activation: str,
    inv_temperature: float = 1.0,
    score_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the row op. Returns ``dZ``, ``dA`` (Z's dtype) and ``dsb`` [T, N] (accumulation dtype)."""
    T, W = Z.shape
    r = W // n_adapters
    Zf = acc(Z)
    G = activation_fn(activation)(Zf).view(T, n_adapters, r)
    dYf = acc(dY).view(T, n_adapters, r)
    p = p.to(Zf.dtype)
    g = (dYf * G).sum(-1)
    if dp is not None:
        g = g + dp.to(g.dtype)
    ds = p * (g - (p * g).sum(-1, keepdim=True)) * inv_temperature
    if score_scale is not None:
        ds = ds * score_scale.to(ds.dtype)
    dG = p.unsqueeze(-1) * dYf + ds.unsqueeze(-1) * acc(A).view(T, n_adapters, r)
    dA = ds.unsqueeze(-1) * G
    dZ = dG.view(T, W) * activation_grad(activation, Zf)
    return dZ.to(Z.dtype), dA.view(T, W).to(A.dtype), ds


_INPLACE_ACT = {"relu": torch.relu_, "tanh": torch.tanh_, "sigmoid": torch.sigmoid_,
                "silu": lambda z: F.silu(z, inplace=True), "linear": lambda z: z}


def rowop_torch(Z, A, sb, n_adapters, activation, inv_temperature=1.0, score_scale=None, prior=None):
    """The row op of the torch backend, in differentiable torch ops (autograd derives the backward).

    float32 / float64 storage: the score products run in the storage dtype, which is the
    accumulation dtype. 16-bit storage (autocast, ``model.half()``): the activation and the score
    products run in float32, so the probabilities are float32-accurate as in the kernels. Without
    autograd (inference) the activation and the p-scaling of float32/float64 inputs run in place
    on ``Z``'s storage, which the caller gives up: that saves two [T, N*r] allocations per layer.
    """
    T, W = Z.shape
    r = W // n_adapters
    wide = Z.dtype in (torch.float32, torch.float64)
    inplace = wide and not torch.is_grad_enabled()
    if inplace and activation in _INPLACE_ACT:
        G = _INPLACE_ACT[activation](Z)
    else:
        G = activation_fn(activation)(Z if wide else Z.float())
    G3 = G.view(T, n_adapters, r)
    s = (as_dtype(A.view(T, n_adapters, r), G.dtype) * G3).sum(-1)
    if sb is not None:
        s = s + as_dtype(sb, s.dtype)
    p = torch.softmax(_tempered(acc(s), inv_temperature, score_scale, prior), dim=-1)
    pc = as_dtype(p, G.dtype).unsqueeze(-1)
    Y = G3.mul_(pc) if inplace else G3 * pc
    return as_dtype(Y.view(T, W), Z.dtype), p
