"""Torch fast path (re-associated algebra) and the row op against the naive reference path."""

import dataclasses

import pytest
import torch

from afkern.activations import KERNEL_ACTIVATIONS, activation_fn, activation_grad
from afkern.backends.torch_ops import layer as fusion_layer_torch
from afkern.ops.fold import fold_weights
from afkern.ops.rowop import rowop_torch as rowop_autograd_torch
from afkern.ops.params import FusionParams
from afkern.ops.reference import fusion_layer_reference
from afkern.ops.rowop import rowop_backward, rowop_forward

from conftest import make_params, make_spec
from exact_probs import assert_probs_float32_accurate, check_layer_probs
from parity import CONFIGS, assert_f64, judge, judge_all, run_layer

pytestmark = pytest.mark.usefixtures("one_thread")

def _params_for(cfg, N, r, d, dtype, seed=0):
    return make_params(N, r, d, dtype=dtype, seed=seed, value=cfg.get("value", True),
                       query=cfg.get("query", True), key=cfg.get("key", True))


def _inputs(T, d, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype)
    return h, x


def _leaves(P: FusionParams):
    return {f.name: getattr(P, f.name) for f in dataclasses.fields(P) if getattr(P, f.name) is not None}


def _run(fn, h, x, P, spec, **kw):
    """(out, probs, grads) of ``fn(h, x, P, spec, **kw)``, the loss on the output and the probabilities."""
    return run_layer(lambda hh, xx, PP, sp: fn(hh, xx, PP, sp, **kw), h, x, P, spec)


# ----------------------------------------------------------------------------- row op
@pytest.mark.parametrize("act", sorted(KERNEL_ACTIVATIONS) + ["relu6", "mish"])
def test_activation_grad_closed_form(act):
    z = torch.linspace(-4, 4, 101, dtype=torch.float64).requires_grad_(True)
    (g,) = torch.autograd.grad(activation_fn(act)(z).sum(), z)
    keep = (z.detach() - 0).abs() > 1e-6  # relu-likes are not differentiable at 0
    keep &= (z.detach() - 6).abs() > 1e-6
    assert torch.allclose(activation_grad(act, z.detach())[keep], g[keep], atol=1e-10)


@pytest.mark.parametrize("act", sorted(KERNEL_ACTIVATIONS))
@pytest.mark.parametrize("T,N,r", [(1, 1, 1), (7, 3, 5), (33, 16, 2)])
@pytest.mark.parametrize("with_sb,with_mask", [(True, False), (False, True)])
def test_rowop_forward_backward_match_autograd(act, T, N, r, with_sb, with_mask):
    g = torch.Generator().manual_seed(T * 100 + N)
    Z = torch.randn(T, N * r, generator=g, dtype=torch.float64).requires_grad_(True)
    A = torch.randn(T, N * r, generator=g, dtype=torch.float64).requires_grad_(True)
    sb = torch.randn(T, N, generator=g, dtype=torch.float64).requires_grad_(True) if with_sb else None
    mask = ((torch.rand(T, N, generator=g) > 0.3).double() / 0.7) if with_mask else None
    it = 0.37
    Y, p = rowop_autograd_torch(Z, A, sb, N, act, it, mask)
    Y2, p2 = rowop_forward(Z.detach(), A.detach(), None if sb is None else sb.detach(), N, act, it, mask)
    assert_f64("Y", Y2, Y)
    assert_f64("p", p2, p)
    # both against the row op written out here (they share the tempering helper)
    G = activation_fn(act)(Z.detach()).view(T, N, r)
    s = (A.detach().view(T, N, r) * G).sum(-1) + (0 if sb is None else sb.detach())
    p_want = torch.softmax(s * (1 if mask is None else mask) * it, dim=-1)
    torch.testing.assert_close(p2.double(), p_want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(Y2, (G * p_want.unsqueeze(-1)).view(T, N * r), atol=1e-12, rtol=1e-10)
    dY = torch.randn(Y.shape, generator=g, dtype=torch.float64)
    dp = torch.randn(p.shape, generator=g, dtype=torch.float64)
    ins = [Z, A] + ([sb] if sb is not None else [])
    grads = torch.autograd.grad((Y * dY).sum() + (p.double() * dp).sum(), ins)
    dZ, dA, dsb = rowop_backward(dY, dp, Z.detach(), A.detach(), p.detach(), N, act, it, mask)
    assert_f64("dZ", dZ, grads[0])
    assert_f64("dA", dA, grads[1])
    if sb is not None:
        assert_f64("dsb", dsb, grads[2])


def test_rowop_rejects_bad_shapes():
    Z = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="multiple of the adapter count"):
        rowop_forward(Z, Z, None, 4, "relu")
    with pytest.raises(ValueError, match="same shape"):
        rowop_forward(Z, torch.zeros(4, 5), None, 3, "relu")
    with pytest.raises(ValueError, match=r"sb of shape \[T, N\]"):
        rowop_forward(Z, Z, torch.zeros(4, 2), 3, "relu")


# ----------------------------------------------------------------------------- layer
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("T,N,r,d", [(1, 1, 3, 24), (7, 3, 5, 40), (123, 16, 2, 24)])
def test_fast_path_matches_reference_float64(name, T, N, r, d):
    cfg = CONFIGS[name]
    if cfg.get("fusion") is False and N == 1:
        cfg = dict(cfg, active=0)
    spec = make_spec(N, r, d, **cfg)
    P = _params_for(cfg, N, r, d, torch.float64)
    h, x = _inputs(T, d, torch.float64)
    it = 0.5
    out_r, p_r, g_r = _run(fusion_layer_reference, h, x, P, spec, inv_temperature=it)
    out_f, p_f, g_f = _run(fusion_layer_torch, h, x, P, spec, inv_temperature=it)
    assert_f64("out", out_f, out_r)
    if p_r is not None:
        assert_f64("probs", p_f, p_r)
        if N > 1:  # a one-hot or uniform softmax would hide wrong scores
            assert p_r.max(-1).values.mean() < 0.95 and p_r.std() > 1e-3, "softmax must not be degenerate in a test"
    judge_all("grad ", g_f, g_r, g_r, torch.float64)
    # the inference path with folded weights
    with torch.no_grad():
        out_fold, p_fold = fusion_layer_torch(h, x, P, spec, it, folded=fold_weights(P, spec) if spec.fusion else None)
    assert_f64("folded out", out_fold, out_r)
    if p_r is not None:
        assert_f64("folded probs", p_fold, p_r)


@pytest.mark.parametrize("name", ["dynamic", "residual_before", "query_before_ln", "houlsby"])
def test_score_dropout_mask_matches_reference(name):
    N, r, d, T = 3, 4, 24, 9
    cfg = CONFIGS[name]
    spec = make_spec(N, r, d, **cfg)
    P = _params_for(cfg, N, r, d, torch.float64)
    h, x = _inputs(T, d, torch.float64)
    mask = (torch.rand(T, N, generator=torch.Generator().manual_seed(3)) > 0.4).double() / 0.6
    out_r, p_r, g_r = _run(fusion_layer_reference, h, x, P, spec, score_scale=mask)
    out_f, p_f, g_f = _run(fusion_layer_torch, h, x, P, spec, score_scale=mask)
    assert_f64("out", out_f, out_r)
    assert_f64("probs", p_f, p_r)
    judge_all("grad ", g_f, g_r, g_r, torch.float64)


@pytest.mark.parametrize("name", ["dynamic", "static", "residual_before", "query_before_ln", "residual_post_add"])
def test_gradcheck_float64(name):
    N, r, d, T = 3, 2, 8, 5
    cfg = CONFIGS[name]
    spec = make_spec(N, r, d, **dict(cfg, activation="tanh"))  # smooth activation for finite differences
    P = _params_for(cfg, N, r, d, torch.float64)
    h, x = _inputs(T, d, torch.float64)
    leaves = _leaves(P)
    keys = list(leaves)

    def f(hh, xx, *ts):
        out, probs = fusion_layer_torch(hh, xx, FusionParams(**dict(zip(keys, ts))), spec, 0.7)
        return out, probs.double()

    inputs = [h.requires_grad_(True), x.requires_grad_(True)] + [leaves[k].clone().requires_grad_(True) for k in keys]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["dynamic", "static", "houlsby"])
def test_low_precision_2x_reference_error(dtype, name):
    """Fast path in float32/bfloat16 vs the float64 reference: output, probabilities and every
    gradient no worse than 2x the error of the reference path itself run in the same dtype."""
    N, r, d, T = 16, 6, 40, 123
    cfg = CONFIGS[name]
    spec = make_spec(N, r, d, **cfg)
    P64 = _params_for(cfg, N, r, d, torch.float64)
    Plo = FusionParams(**{k: (None if v is None else v.to(dtype)) for k, v in P64.__dict__.items()})
    h, x = _inputs(T, d, torch.float64)
    ref64 = _run(fusion_layer_reference, h, x, P64, spec)
    reflo = _run(fusion_layer_reference, h.to(dtype), x.to(dtype), Plo, spec)
    fast = _run(fusion_layer_torch, h.to(dtype), x.to(dtype), Plo, spec)
    judge("out", fast[0], reflo[0], ref64[0], dtype)
    judge("probs", fast[1], reflo[1], ref64[1], dtype)
    judge_all("grad ", fast[2], reflo[2], ref64[2], dtype)


def test_folded_weights_match_unfolded_float32():
    """Inference, folded and unfolded, each by the 2x rule against the float64 reference."""
    N, r, d, T = 16, 3, 40, 31
    spec = make_spec(N, r, d)
    P = make_params(N, r, d, dtype=torch.float32)
    P64 = make_params(N, r, d, dtype=torch.float64)
    h, x = _inputs(T, d, torch.float32)
    with torch.no_grad():
        truth, p64 = fusion_layer_reference(h.double(), x.double(), P64, spec)
        base, pbase = fusion_layer_reference(h, x, P, spec)
        a, pa = fusion_layer_torch(h, x, P, spec)
        b, pb = fusion_layer_torch(h, x, P, spec, folded=fold_weights(P, spec))
    for what, (y, p) in {"unfolded": (a, pa), "folded": (b, pb)}.items():
        judge(f"{what} out", y, base, truth)
        judge(f"{what} probs", p, pbase, p64)


# ----------------------------------------------------------------------------- 16-bit probabilities
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rowop_probabilities_float32_accurate_in_half_precision(dtype):
    """The row op's contract and the torch backend's row op take 16-bit Z, A, sb but compute scores
    and softmax in float32: p matches float64 on the same values to float32 accuracy."""
    T, N, r = 67, 6, 9
    g = torch.Generator().manual_seed(4)
    Z, A = (torch.randn(T, N * r, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    sb = torch.randn(T, N, generator=g, dtype=torch.float64).to(dtype)
    M = (torch.rand(T, N, generator=g) >= 0.3).float() / 0.7
    prior = torch.randn(N, generator=g)
    for mask in (None, M):
        G = torch.relu(Z.double()).view(T, N, r)
        s = (A.double().view(T, N, r) * G).sum(-1) + sb.double()
        if mask is not None:
            s = s * mask.double()
        p64 = torch.softmax(s * 0.6 + prior.double(), dim=-1)
        for name, fn in (("rowop_forward", rowop_forward), ("rowop_torch", rowop_autograd_torch)):
            Y, p = fn(Z, A, sb, N, "relu", 0.6, mask, prior)
            assert Y.dtype == dtype
            assert_probs_float32_accurate(name, p, p64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_probabilities_float32_accurate_in_half_precision(dtype):
    """The torch backend's layer in 16 bits, training and folded: float32-accurate fusion weights."""
    check_layer_probs("torch", fusion_layer_torch, dtype, fold=fold_weights)
