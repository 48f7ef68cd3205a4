"""The CUDA backend's custom ops (afkern/backends/cuda_ops.py, csrc/) against float64 references.

The ops ``torch.ops.afkern.{rowop_fwd, rowop_bwd, add_layernorm_fwd, add_layernorm_bwd}`` are
defined in Python with a fake (meta) implementation, autograd, and a CPU reference kernel, so
everything here runs on a CPU-only torch: schemas, fakes, ``opcheck``, outputs and gradients of
the op path and of the whole layer through the ops. Where a GPU and the built extension are
present, every numeric test also runs on ``cuda``, i.e. on the CUDA kernels.

``AFKERN_EXPECT_EXTENSION=1`` (set by scripts/test_cuda_build.sh, which builds the extension
in .venv-cuda) makes the extension's absence a failure instead of the expected state.

Judges: the row op against a float64 oracle on the same low-precision inputs with a fixed bound per
dtype (one rounding of each output; the probabilities to float32 accuracy in every dtype); the layer
against the float64 reference with a bound of 2x the reference's own error in the same dtype. Never
against the torch backend, which shares the prologue, the fold and ``shared_score`` with this one.
On this CPU-only machine these tests exercise the ops' Python CPU kernels; ``csrc/`` is checked on a
GPU (``AFKERN_TEST_GPU=1``, scripts/gpu_tests.txt), e.g. ``test_layer_bert_base_width_gpu``.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import afkern
from afkern.backends import cuda_ops as _cuda
from afkern.activations import KERNEL_ACTIVATIONS, activation_fn
from afkern.ops.fold import fold_weights
from afkern.ops.layer import fusion_layer
from afkern.ops.reference import fusion_layer_reference

from conftest import make_params, make_spec
from parity import CONFIGS, rel_err
from exact_probs import check_layer_probs

pytestmark = pytest.mark.usefixtures("one_thread")

EXT_OK, EXT_WHY = _cuda.extension_status()
HAS_GPU = torch.cuda.is_available() and EXT_OK
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])
_needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and the built extension afkern._C")


def gpu(fn):
    """A test of the CUDA kernels themselves: marked ``gpu`` and skipped without a device."""
    return pytest.mark.gpu(_needs_gpu(fn))


OPS = ("rowop_fwd", "rowop_bwd", "add_layernorm_fwd", "add_layernorm_bwd")
SCHEMAS = {
    "rowop_fwd": "afkern::rowop_fwd(Tensor Z, Tensor A, Tensor? sb, Tensor? score_scale, Tensor? prior, int n_adapters, "
    "int activation, float inv_temperature) -> (Tensor, Tensor)",
    "rowop_bwd": "afkern::rowop_bwd(Tensor dY, Tensor? dp, Tensor Z, Tensor A, Tensor p, Tensor? score_scale, "
    "int n_adapters, int activation, float inv_temperature) -> (Tensor, Tensor, Tensor)",
    "add_layernorm_fwd": "afkern::add_layernorm_fwd(Tensor x, Tensor residual, Tensor weight, Tensor bias, "
    "float eps) -> (Tensor, Tensor, Tensor)",
    "add_layernorm_bwd": "afkern::add_layernorm_bwd(Tensor dout, Tensor x, Tensor residual, Tensor weight, "
    "Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)",
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Error floor added to "2x the reference's own error" (relative Frobenius error against float64).
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}
# Row op: outputs are computed in float32 from the inputs and rounded once to the storage dtype, so
# their relative error against float64 on the same inputs is at most the dtype's unit roundoff plus
# float32 arithmetic (P_BOUND, grown like sqrt(r) for the r-term float32 score sums of wide rows);
# the probabilities stay float32-accurate in every dtype (a bf16 softmax is off by ~1e-3).
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
P_BOUND = 1e-5


def _acc_bound(r):
    return P_BOUND * max(1.0, (r / 64) ** 0.5)


rel = rel_err


def assert_2x_ref(name, ours, ref_low, ref, dtype):
    """flash-attention's criterion with the oracle as the baseline: our error against float64 at most
    2x the error of the reference path run in the same dtype (it shares no code with the op path)
    + a floor."""
    e_ours, e_ref = rel(ours, ref), rel(ref_low, ref)
    assert e_ours <= 2 * e_ref + FLOOR[dtype], f"{name}: error {e_ours:.3g} vs the reference's own {e_ref:.3g} ({dtype})"


def assert_within(name, ours, ref, bound):
    e = rel(ours, ref)
    assert e <= bound, f"{name}: relative error {e:.3g} against float64 on the same inputs > {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# registration, schemas, fakes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_schema_registered(op):
    assert str(getattr(torch.ops.afkern, op).default._schema) == SCHEMAS[op]
    for key in ("CPU", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"afkern::{op}", key), (op, key)


def test_extension_state():
    if os.environ.get("AFKERN_EXPECT_EXTENSION") == "1":
        assert EXT_OK, EXT_WHY
    if EXT_OK:
        for op in OPS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"afkern::{op}", "CUDA"), op
    else:
        assert "not built" in EXT_WHY and "AFKERN_FORCE_CUDA_BUILD" in EXT_WHY and "AFKERN_JIT_BUILD" in EXT_WHY


def test_backend_cuda_raises_clearly_without_gpu_tensors():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        afkern.resolve_backend("cuda", "cpu")
    N, r, d = 2, 3, 8
    P = make_params(N, r, d, dtype=torch.float32)
    h = torch.randn(4, d)
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        _cuda.layer(h, h, P, make_spec(N, r, d))
    if not EXT_OK:
        with pytest.raises(RuntimeError, match="not built"):
            _cuda.layer(h, h, P, make_spec(N, r, d))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,r", [(1, 1, 3), (7, 3, 48), (123, 16, 5)])
def test_fakes_shapes_and_dtypes(T, N, r, dtype):
    ops = torch.ops.afkern
    with FakeTensorMode():
        Z = torch.empty(T, N * r, dtype=dtype)
        A = torch.empty(T, N * r, dtype=dtype)
        sb = torch.empty(T, N, dtype=dtype)
        ss = torch.empty(T, N, dtype=torch.float32)
        Y, p = ops.rowop_fwd(Z, A, sb, ss, ss, N, 1, 1.0)
        assert (Y.shape, Y.dtype, p.shape, p.dtype) == ((T, N * r), dtype, (T, N), torch.float32)
        dZ, dA, dsb = ops.rowop_bwd(Z, p, Z, A, p, None, N, 1, 1.0)
        assert (dZ.shape, dZ.dtype, dA.dtype, dsb.shape, dsb.dtype) == ((T, N * r), dtype, dtype, (T, N), torch.float32)
        d = N * r
        w = torch.empty(d, dtype=dtype)
        out, mean, rstd = ops.add_layernorm_fwd(Z, A, w, w, 1e-5)
        assert (out.shape, out.dtype, mean.shape, mean.dtype, rstd.dtype) == ((T, d), dtype, (T,), torch.float32, torch.float32)
        dx, dw, db = ops.add_layernorm_bwd(Z, Z, A, w, mean, rstd)
        assert (dx.shape, dx.dtype, dw.shape, dw.dtype, db.shape) == ((T, d), dtype, (d,), dtype, (d,))
    # meta tensors take the same implementation
    Ym, pm = ops.rowop_fwd(torch.empty(T, N * r, dtype=dtype, device="meta"),
                           torch.empty(T, N * r, dtype=dtype, device="meta"), None, None, None, N, 0, 0.5)
    assert Ym.device.type == "meta" and Ym.shape == (T, N * r) and pm.dtype == torch.float32


@pytest.mark.parametrize("bad,match", [
    (dict(A=(7, 10)), r"expected A of shape \[7, 12\]"),
    (dict(N=5), "positive multiple of n_adapters"),
    (dict(N=65, W=65 * 2), r"1 <= n_adapters <= 64"),
    (dict(sb=(7, 4)), r"expected sb of shape \[7, 3\]"),
    (dict(act=42), "activation code"),
    (dict(ss_dtype=torch.float16), "score_scale of dtype torch.float32"),
])
def test_fake_rejects_bad_inputs(bad, match):
    W = bad.get("W", 12)
    N = bad.get("N", 3)
    with FakeTensorMode():
        Z = torch.empty(7, W)
        A = torch.empty(*bad.get("A", (7, W)))
        sb = torch.empty(*bad.get("sb", (7, N)))
        ss = torch.empty(7, N, dtype=bad.get("ss_dtype", torch.float32))
        with pytest.raises(ValueError, match=match):
            torch.ops.afkern.rowop_fwd(Z, A, sb, ss, None, N, bad.get("act", 1), 1.0)


def test_ln_fake_rejects_bad_inputs():
    with FakeTensorMode():
        x = torch.empty(5, 24)
        with pytest.raises(ValueError, match=r"expected weight of shape \[24\]"):
            torch.ops.afkern.add_layernorm_fwd(x, x, torch.empty(23), torch.empty(24), 1e-5)
        with pytest.raises(ValueError, match="expected residual of shape"):
            torch.ops.afkern.add_layernorm_fwd(x, torch.empty(5, 23), torch.empty(24), torch.empty(24), 1e-5)


# ---------------------------------------------------------------------------------------------
# opcheck (schema, autograd registration, fake vs real, AOT dispatch)
# ---------------------------------------------------------------------------------------------


def _rowop_args(T, N, r, dtype, device, sb=True, ss=False, grad=False):
    g = torch.Generator().manual_seed(T * 100 + N * 10 + r)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    Z, A = mk(T, N * r), mk(T, N * r)
    sbt = mk(T, N) if sb else None
    sst = ((torch.rand(T, N, generator=g) > 0.3).float() / 0.7).to(device) if ss else None
    return Z, A, sbt, sst


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,sb,ss", [(torch.float32, True, True), (torch.bfloat16, False, False)])
def test_opcheck(device, dtype, sb, ss):
    T, N, r = 5, 3, 4
    Z, A, sbt, sst = _rowop_args(T, N, r, dtype, device, sb=sb, ss=ss, grad=True)
    prior = torch.randn(T, N, device=device) if ss else None
    torch.library.opcheck(torch.ops.afkern.rowop_fwd.default, (Z, A, sbt, sst, prior, N, 2, 0.5))
    with torch.no_grad():
        Y, p = torch.ops.afkern.rowop_fwd(Z, A, sbt, sst, prior, N, 2, 0.5)
    dY, dp = torch.randn_like(Y), torch.randn_like(p)
    torch.library.opcheck(torch.ops.afkern.rowop_bwd.default, (dY, dp, Z.detach(), A.detach(), p, sst, N, 2, 0.5))
    d = 24
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    res = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(d, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(d, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.afkern.add_layernorm_fwd.default, (x, res, w, b, 1e-5))
    with torch.no_grad():
        _, mean, rstd = torch.ops.afkern.add_layernorm_fwd(x, res, w, b, 1e-5)
    torch.library.opcheck(torch.ops.afkern.add_layernorm_bwd.default,
                          (torch.randn_like(x), x.detach(), res.detach(), w.detach(), mean, rstd))


# ---------------------------------------------------------------------------------------------
# numerics: row op
# ---------------------------------------------------------------------------------------------


def _rowop_oracle(Z, A, sb, N, act, inv_t, ss, prior=None):
    """float64 row op, differentiable (the math of afkern/ops/rowop.py written out, no float32 casts)."""
    T, W = Z.shape
    G = activation_fn(act)(Z).view(T, N, W // N)
    s = (A.view(T, N, -1) * G).sum(-1)
    if sb is not None:
        s = s + sb
    if ss is not None:
        s = s * ss.to(s.dtype)
    s = s * inv_t
    if prior is not None:
        s = s + prior.to(s.dtype)
    p = torch.softmax(s, dim=-1)
    return (G * p.unsqueeze(-1)).reshape(T, W), p


def _grads(fn, inputs, gY, gp):
    Y, p = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad((Y.double() * gY).sum() + (p.double() * gp).sum(), leaves)
    return Y, p, grads


def _check_rowop(T, N, r, dtype, device, act="relu", inv_t=0.7, sb=True, ss=False, layout="contiguous", prior=False):
    Z0, A0, sb0, ss0 = _rowop_args(T, N, r, dtype, device, sb=sb, ss=ss)
    pr0 = torch.randn(T, N, generator=torch.Generator().manual_seed(11)).to(device) if prior else None
    if layout != "contiguous":
        # the folded inference path hands the op column slices of one [T, 2 N r + N (+pad)] matrix;
        # "offset" starts Z one element in, so no row is 16-byte aligned (scalar path)
        pad = 1 if layout == "offset" else 0
        big = torch.zeros(T, pad + 2 * N * r + N + 3, device=device, dtype=dtype)
        big[:, pad:pad + N * r] = Z0
        big[:, pad + N * r:pad + 2 * N * r] = A0
        if sb:
            big[:, pad + 2 * N * r:pad + 2 * N * r + N] = sb0
        Z0, A0 = big[:, pad:pad + N * r], big[:, pad + N * r:pad + 2 * N * r]
        sb0 = big[:, pad + 2 * N * r:pad + 2 * N * r + N] if sb else None
        assert not Z0.is_contiguous()
    # upstream gradients representable in the dtypes the op receives them in (Y's dtype, p's
    # float32), so the op and the float64 oracle see exactly the same inputs
    gen = torch.Generator().manual_seed(7)
    gY = torch.randn(T, N * r, generator=gen, dtype=torch.float64).to(dtype).double().to(device)
    gp = torch.randn(T, N, generator=gen, dtype=torch.float64).float().double().to(device)

    def leaves(cast):
        out = [cast(Z0).requires_grad_(True), cast(A0).requires_grad_(True)]
        out.append(cast(sb0).requires_grad_(True) if sb else None)
        return out

    Z, A, sbt = leaves(lambda t: t.detach().clone())
    Y, p, g = _grads(lambda *a: _cuda.rowop(*a[:3], N, act, inv_t, ss0, pr0), [Z, A, sbt], gY, gp)
    Zr, Ar, sbr = leaves(lambda t: t.detach().double())
    Yr, pr, gr = _grads(lambda *a: _rowop_oracle(*a[:3], N, act, inv_t, ss0, pr0), [Zr, Ar, sbr], gY, gp)

    assert Y.dtype == dtype and p.dtype == torch.float32 and Y.shape == (T, N * r) and p.shape == (T, N)
    assert torch.allclose(p.sum(-1).double(), torch.ones(T, dtype=torch.float64, device=device), atol=1e-5)
    assert_within("Y", Y, Yr, UNIT_ROUNDOFF[dtype] + _acc_bound(r))
    assert_within("p", p, pr, _acc_bound(r))  # float32-accurate whatever the storage dtype
    for name, a, c in zip(("dZ", "dA", "dsb"), g, gr):
        assert a.dtype == dtype and a.shape == c.shape, name
        assert_within(name, a, c, UNIT_ROUNDOFF[dtype] + _acc_bound(r))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,r", [(1, 1, 3), (7, 3, 48), (123, 16, 3), (7, 16, 48), (123, 3, 5)])
def test_rowop_shapes(T, N, r, dtype, device):
    _check_rowop(T, N, r, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", sorted(KERNEL_ACTIVATIONS))
def test_rowop_activations(act, device):
    _check_rowop(7, 3, 48, torch.float32, device, act=act, inv_t=1.0)
    if device == "cuda":
        _check_rowop(123, 16, 5, torch.bfloat16, device, act=act, inv_t=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["slices", "offset"])
def test_rowop_strided_inputs_and_score_dropout(layout, dtype, device):
    _check_rowop(7, 3, 48, dtype, device, act="gelu", ss=True, layout=layout)
    _check_rowop(7, 16, 3, dtype, device, act="silu", sb=False, layout=layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rowop_prior_and_score_dropout(dtype, device):
    """A [T, N] prior (controls, routing) after the temperature, with a score-dropout scale."""
    _check_rowop(9, 5, 6, dtype, device, ss=True, prior=True)


@gpu
def test_rowop_64_adapters_and_wide_rows():
    _check_rowop(7, 64, 3, torch.bfloat16, "cuda")
    _check_rowop(3, 2, 4099, torch.float32, "cuda")  # several chunks per thread, scalar tail


# ---------------------------------------------------------------------------------------------
# numerics: residual add + LayerNorm
# ---------------------------------------------------------------------------------------------


def _check_ln(T, d, dtype, device, affine=True):
    g = torch.Generator().manual_seed(T + d)
    mk = lambda *s, sc=1.0, sh=0.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc + sh).to(device=device, dtype=dtype)  # noqa: E731
    base = [mk(T, d, sh=0.5), mk(T, d), mk(d, sc=0.2, sh=1.0) if affine else None, mk(d, sc=0.2) if affine else None]
    gout = torch.randn(T, d, generator=g, dtype=torch.float64).to(device)
    eps = 1e-12 if dtype == torch.float32 else 1e-5

    def run(fn, cast):
        ins = [None if t is None else cast(t).requires_grad_(True) for t in base]
        out = fn(*ins, eps)
        grads = torch.autograd.grad((out.double() * gout).sum(), [t for t in ins if t is not None])
        return out, grads

    out, gs = run(_cuda.add_layer_norm, lambda t: t.detach().clone())
    # baseline: PyTorch's own LayerNorm in this dtype (flash-attention's criterion)
    out_t, gs_t = run(lambda x, r_, w, b, e: F.layer_norm(x + r_, (d,), w, b, e), lambda t: t.detach().clone())
    out_r, gs_r = run(lambda x, r_, w, b, e: F.layer_norm(x + r_, (d,), w, b, e), lambda t: t.detach().double())
    assert out.dtype == dtype and out.shape == (T, d)
    assert_2x_ref("out", out, out_t, out_r, dtype)
    for name, a, b, c in zip(("dx", "dresidual", "dweight", "dbias"), gs, gs_t, gs_r):
        assert a.dtype == dtype and a.shape == c.shape, name
        assert_2x_ref(name, a, b, c, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d", [(1, 24), (7, 40), (123, 768), (1151, 40), (5, 3)])
def test_add_layer_norm(T, d, dtype, device):
    _check_ln(T, d, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_add_layer_norm_no_affine(device):
    _check_ln(7, 40, torch.float32, device, affine=False)


def test_add_layer_norm_float64_gradcheck():
    """The op path on CPU in float64: autograd formula of the ops checked by finite differences."""
    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((5, 7), (5, 7), (7,), (7,))]
    assert torch.autograd.gradcheck(lambda *a: _cuda.add_layer_norm(*a, 1e-5), ins)


@gpu
def test_add_layer_norm_wide_rows_large_smem():
    _check_ln(300, 8192, torch.bfloat16, "cuda")  # 64 KiB of dweight/dbias partials: opt-in shared memory
    _check_ln(3, 1001, torch.float32, "cuda")


# ---------------------------------------------------------------------------------------------
# the layer through the ops (backend "cuda" on a GPU; the same composition on CPU)
# ---------------------------------------------------------------------------------------------


def _layer_fn(device):
    if device == "cuda":
        return _cuda.layer
    return lambda h, x, P, spec, *a: fusion_layer(h, x, P, spec, _cuda.PRIMITIVES, *a)


def _leaf_params(P, cast):
    return type(P)(**{k: None if v is None else cast(v).requires_grad_(True) for k, v in P.__dict__.items()})


# the flag combinations of the parity tests (tests/parity.py CONFIGS); "dynamic" here with gelu
LAYER_CONFIGS = {"dynamic": dict(activation="gelu"),
                 **{k: CONFIGS[k] for k in ("residual_before", "query_before_ln", "static", "residual_post_add")}}


def _check_layer(T, N, r, d, dtype, device, cfg, dropout=False, folded=False, it=0.8):
    """The layer through the ops (unfolded with every gradient, or folded inference) against the
    float64 reference; baseline: the reference run in ``dtype``."""
    spec = make_spec(N, r, d, ln_eps=1e-5, **dict(dict(activation="relu"), **cfg))
    P0 = make_params(N, r, d, dtype=torch.float64, device=device, value=spec.value)
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(T, d, generator=g, dtype=torch.float64).to(device)
    x0 = torch.randn(T, d, generator=g, dtype=torch.float64).to(device)
    gout = torch.randn(T, d, generator=g, dtype=torch.float64).to(device)
    M = ((torch.rand(T, N, generator=g) >= 0.3).float() / 0.7).to(device) if dropout else None
    lo = lambda t: t.detach().to(dtype)  # noqa: E731

    def run(fn, cast, fold=False):
        P = _leaf_params(P0, cast)
        h, x = cast(h0).requires_grad_(not fold), cast(x0).requires_grad_(not fold)
        if fold:
            with torch.no_grad():
                return fn(h, x, P, spec, it, None, fold_weights(P, spec)) + ((),)
        out, probs = fn(h, x, P, spec, it, M)
        leaves = [h, x] + [v for v in P.__dict__.values() if v is not None]
        return out, probs, torch.autograd.grad((out.double() * gout).sum(), leaves, materialize_grads=True)  # bk cancels

    out, probs, gs = run(_layer_fn(device), lo, folded)
    out_l, probs_l, gs_l = run(fusion_layer_reference, lo)
    out_r, probs_r, gs_r = run(fusion_layer_reference, lambda t: t.detach().clone())
    what = "folded" if folded else "unfolded"
    assert out.dtype == dtype and probs.dtype == torch.float32
    assert_2x_ref(f"{what} out", out, out_l, out_r, dtype)
    assert_2x_ref(f"{what} probs", probs, probs_l, probs_r, dtype)
    names = ["h", "input_tensor"] + [k for k, v in P0.__dict__.items() if v is not None]
    for name, a, b, c in zip(names, gs, gs_l, gs_r):
        assert_2x_ref(f"d{name}", a, b, c, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,r,d", [(7, 3, 5, 40), (1, 1, 3, 24), (123, 16, 3, 24)])
def test_layer_matches_reference(T, N, r, d, dtype, device):
    _check_layer(T, N, r, d, dtype, device, LAYER_CONFIGS["dynamic"], dropout=N > 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LAYER_CONFIGS))
def test_layer_configs_match_reference(name, dtype, device):
    """Each AdapterHub option the shared layer code handles (prologue, shared_score under score
    dropout, value map), through the ops, with score dropout."""
    _check_layer(9, 4, 6, 40, dtype, device, LAYER_CONFIGS[name], dropout=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LAYER_CONFIGS))
def test_layer_folded_inference(name, dtype, device):
    """Folded weights (afkern.ops.fold) hand the row op column slices of one GEMM output (strided rows)."""
    _check_layer(123, 16, 3, 40, dtype, device, LAYER_CONFIGS[name], folded=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_probabilities_float32_accurate_in_half_precision(dtype, device):
    """Scores and softmax in float32 in a 16-bit layer, training and folded (tests/exact_probs.py)."""
    check_layer_probs(f"cuda ops ({device})", _layer_fn(device), dtype, device=device, fold=fold_weights)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_layer_bert_base_width_gpu(dtype):
    """The CUDA kernels at BERT-base width (d = 768, r = 48, N = 16, 123 tokens) against float64:
    the row op alone, the layer in training with score dropout (every gradient), folded inference."""
    _check_rowop(123, 16, 48, dtype, "cuda", ss=True)
    _check_rowop(123, 16, 48, dtype, "cuda", layout="slices")
    _check_layer(123, 16, 48, 768, dtype, "cuda", dict(activation="relu"), dropout=True)
    _check_layer(123, 16, 48, 768, dtype, "cuda", dict(residual_before=True), dropout=True)
    _check_layer(123, 16, 48, 768, dtype, "cuda", dict(activation="relu"), folded=True)
    check_layer_probs("cuda", _cuda.layer, dtype, device="cuda", N=16, r=48, d=768, T=123, fold=fold_weights)


# ---------------------------------------------------------------------------------------------
# GPU-only: the C++ entry points' own checks
# ---------------------------------------------------------------------------------------------


@gpu
def test_cuda_entry_point_errors():
    ops = torch.ops.afkern
    Z = torch.randn(4, 6, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.rowop_fwd(Z, Z, None, None, None, 2, 1, 1.0)
    Zt = torch.randn(6, 4, device="cuda").t()
    with pytest.raises(RuntimeError, match="unit stride"):
        ops.rowop_fwd(Zt, Zt, None, None, None, 2, 1, 1.0)
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="on cpu|on the device|device"):
        ops.add_layernorm_fwd(x, x, torch.ones(8), torch.zeros(8, device="cuda"), 1e-5)
    with pytest.raises(RuntimeError, match="expected x to be contiguous"):
        ops.add_layernorm_fwd(x[:, ::2], x[:, ::2], torch.ones(4, device="cuda"), torch.zeros(4, device="cuda"), 1e-5)
