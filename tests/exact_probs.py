"""A fusion layer whose GEMMs are exact in every dtype, to check that a backend's fusion
probabilities are float32-accurate when it runs in bfloat16 or float16 (docs/DESIGN.md section 3:
scores, softmax and backward accumulate in float32 whatever the storage).

In a real 16-bit layer the probabilities move with the rounding of the GEMMs (x Wd, q Wa, ...), so
a softmax computed in bfloat16 hides among those errors. Here the GEMMs cannot round: no query or
key map (q = x), no LayerNorm before the adapters (x = h, ``original_ln_before=False``), zero down
biases, and every row of the down weights, up weights and up biases is one-hot with a +-1 entry.
Then Z, A and sb are entries of h, exactly representable in h's dtype, in every backend, folded or
not (the fold of such weights is one-hot too). The scores sum r exact products in float32, so p
must match the float64 oracle on the same values to float32 accuracy: about 1e-7, where a softmax
(or scores) rounded to bfloat16 is off by 1e-3 or more.
"""

from __future__ import annotations

import torch

from afkern.ops.params import FusionParams
from afkern.ops.reference import fusion_layer_reference

from conftest import make_spec

#: |p - p_float64| allowed (p in [0, 1]; 84 float32 ulps, measured errors are ~1e-7); bfloat16
#: rounding of the scores or probabilities gives >= 1e-3, 100 x more
P_ATOL = 1e-5


def _onehot_rows(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    w = torch.zeros(rows, cols, dtype=torch.float64)
    idx = torch.randint(0, cols, (rows,), generator=g)
    sign = torch.randint(0, 2, (rows,), generator=g).double() * 2 - 1
    w[torch.arange(rows), idx] = sign
    return w


def exact_gemm_layer(N: int, r: int, d: int, T: int, dtype: torch.dtype, device="cpu", seed: int = 0,
                     dropout: bool = False):
    """(spec, P, h, x, score_scale): the layer described above in ``dtype`` on ``device``;
    ``score_scale`` a score-dropout mask (rate 0.5: 0 or exactly 2) or None."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    P = FusionParams(
        ln_weight=1 + 0.1 * rn(d), ln_bias=0.1 * rn(d),
        down_weight=_onehot_rows(N * r, d, g).view(N, r, d), down_bias=torch.zeros(N, r, dtype=torch.float64),
        up_weight=_onehot_rows(N * r, d, g).view(N, r, d), up_bias=_onehot_rows(N, d, g),
        value_weight=torch.eye(d, dtype=torch.float64) + 0.1 * rn(d, d),
    )
    P = P.replace(**{k: v.to(device=device, dtype=dtype) for k, v in P.tensors().items() if v is not None})
    spec = make_spec(N, r, d, query=False, key=False, original_ln_before=False, ln_eps=1e-5)
    h, x = rn(T, d).to(device=device, dtype=dtype), rn(T, d).to(device=device, dtype=dtype)
    M = None
    if dropout:
        M = ((torch.rand(T, N, generator=g) >= 0.5).float() * 2.0).to(device)
    return spec, P, h, x, M


def oracle_probs(spec, P, h, x, inv_temperature, M):
    """The float64 reference's p on exactly the same (low-precision) values."""
    P64 = P.replace(**{k: v.double() for k, v in P.tensors().items() if v is not None})
    with torch.no_grad():
        _, p = fusion_layer_reference(h.double(), x.double(), P64, spec, inv_temperature, M)
    return p


def assert_probs_float32_accurate(name: str, p: torch.Tensor, p64: torch.Tensor):
    assert p.dtype == torch.float32, f"{name}: probabilities in {p.dtype}, expected float32"
    err = (p.double() - p64).abs().max().item()
    mmp = p64.max(-1).values.mean().item()
    assert mmp < 0.9, f"{name}: degenerate test case (mean max p {mmp:.3f})"
    assert err <= P_ATOL, f"{name}: fusion probabilities off by {err:.3g} (> {P_ATOL}): not float32-accurate"


def check_layer_probs(name: str, layer, dtype: torch.dtype, device="cpu", N: int = 5, r: int = 7, d: int = 40,
                      T: int = 37, inv_temperature: float = 0.7, fold=None):
    """Run ``layer(h, x, P, spec, inv_temperature, score_scale, folded)`` on the exact-GEMM layer in
    ``dtype``: training (gradients on, with and without score dropout) and, with ``fold``
    (``afkern.ops.fold.fold_weights``), folded inference; every p must be float32-accurate."""
    for dropout in (False, True):
        spec, P, h, x, M = exact_gemm_layer(N, r, d, T, dtype, device, seed=1 + dropout, dropout=dropout)
        p64 = oracle_probs(spec, P, h, x, inv_temperature, M)
        leaves = P.replace(**{k: v.detach().clone().requires_grad_(True) for k, v in P.tensors().items()
                              if v is not None})
        out, p = layer(h.clone().requires_grad_(True), x, leaves, spec, inv_temperature, M, None)
        assert out.requires_grad
        assert_probs_float32_accurate(f"{name} {dtype} training{' + score dropout' if dropout else ''}", p, p64)
        if fold is not None and not dropout:
            with torch.no_grad():
                _, pf = layer(h, x, P, spec, inv_temperature, None, fold(P, spec))
            assert_probs_float32_accurate(f"{name} {dtype} folded inference", pf, p64)
