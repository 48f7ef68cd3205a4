"""The CUDA backend's custom ops (afkern/backends/cuda_ops.py, csrc/) against float64 references.

The ops ``torch.ops.afkern.{rowop_fwd, rowop_bwd, add_layernorm_fwd, add_layernorm_bwd}`` are
defined in Python with a fake (meta) implementation, autograd, and a CPU reference kernel, so
everything here runs on a CPU-only torch: schemas, fakes, ``opcheck``, outputs and gradients of
the op path and of the whole layer through the ops. Where a GPU and the built extension are
present, every numeric test also runs on ``cuda``, i.e. on the CUDA kernels.

``AFKERN_EXPECT_EXTENSION=1`` (set by scripts/test_cuda_build.sh, which builds the extension
in .venv-cuda) makes the extension's absence a failure instead of the expected state.
"""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import afkern
from afkern.backends import cuda_ops as _cuda
from afkern.activations import KERNEL_ACTIVATIONS, activation_fn
from afkern.backends.torch_ops import layer as fusion_layer_torch
from afkern.ops.fold import fold_weights
from afkern.ops.layer import fusion_layer
from afkern.ops.rowop import rowop_torch as rowop_autograd_torch
from afkern.ops.reference import fusion_layer_reference

from conftest import make_params, make_spec

EXT_OK, EXT_WHY = _cuda.extension_status()
HAS_GPU = torch.cuda.is_available() and EXT_OK
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and the built extension afkern._C")

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
# Error floor added to "2x torch's own error" (relative Frobenius error against float64).
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_2x_torch(name, ours, torch_own, ref, dtype):
    """flash-attention's criterion: our error against float64 at most 2x torch's own + a floor."""
    e_ours, e_torch = rel(ours, ref), rel(torch_own, ref)
    assert e_ours <= 2 * e_torch + FLOOR[dtype], f"{name}: error {e_ours:.3g} vs torch's own {e_torch:.3g} ({dtype})"


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


def _rowop_oracle(Z, A, sb, N, act, inv_t, ss):
    """float64 row op, differentiable (the math of afkern/ops/rowop.py without float32 casts)."""
    T, W = Z.shape
    G = activation_fn(act)(Z).view(T, N, W // N)
    s = (A.view(T, N, -1) * G).sum(-1)
    if sb is not None:
        s = s + sb
    if ss is not None:
        s = s * ss.to(s.dtype)
    p = torch.softmax(s * inv_t, dim=-1)
    return (G * p.unsqueeze(-1)).reshape(T, W), p


def _grads(fn, inputs, gY, gp):
    Y, p = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad((Y.double() * gY).sum() + (p.double() * gp).sum(), leaves)
    return Y, p, grads


def _check_rowop(T, N, r, dtype, device, act="relu", inv_t=0.7, sb=True, ss=False, layout="contiguous"):
    Z0, A0, sb0, ss0 = _rowop_args(T, N, r, dtype, device, sb=sb, ss=ss)
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
    gen = torch.Generator().manual_seed(7)
    gY = torch.randn(T, N * r, generator=gen, dtype=torch.float64).to(device)
    gp = torch.randn(T, N, generator=gen, dtype=torch.float64).to(device)

    def leaves(cast):
        out = [cast(Z0).requires_grad_(True), cast(A0).requires_grad_(True)]
        out.append(cast(sb0).requires_grad_(True) if sb else None)
        return out

    Z, A, sbt = leaves(lambda t: t.detach().clone())
    Y, p, g = _grads(lambda *a: _cuda.rowop(*a[:3], N, act, inv_t, ss0), [Z, A, sbt], gY, gp)
    Zt, At, sbtt = leaves(lambda t: t.detach().clone())
    Yt, pt, gt = _grads(lambda *a: rowop_autograd_torch(*a[:3], N, act, inv_t, ss0), [Zt, At, sbtt], gY, gp)
    Zr, Ar, sbr = leaves(lambda t: t.detach().double())
    Yr, pr, gr = _grads(lambda *a: _rowop_oracle(*a[:3], N, act, inv_t, ss0), [Zr, Ar, sbr], gY, gp)

    assert Y.dtype == dtype and p.dtype == torch.float32 and Y.shape == (T, N * r) and p.shape == (T, N)
    assert torch.allclose(p.sum(-1).double(), torch.ones(T, dtype=torch.float64, device=device), atol=1e-5)
    assert_2x_torch("Y", Y, Yt, Yr, dtype)
    assert_2x_torch("p", p, pt, pr, dtype)
    for name, a, b, c in zip(("dZ", "dA", "dsb"), g, gt, gr):
        assert a.dtype == dtype and a.shape == c.shape, name
        assert_2x_torch(name, a, b, c, dtype)


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
    out_t, gs_t = run(lambda x, r_, w, b, e: F.layer_norm(x + r_, (d,), w, b, e), lambda t: t.detach().clone())
    out_r, gs_r = run(lambda x, r_, w, b, e: F.layer_norm(x + r_, (d,), w, b, e), lambda t: t.detach().double())
    assert out.dtype == dtype and out.shape == (T, d)
    assert_2x_torch("out", out, out_t, out_r, dtype)
    for name, a, b, c in zip(("dx", "dresidual", "dweight", "dbias"), gs, gs_t, gs_r):
        assert a.dtype == dtype and a.shape == c.shape, name
        assert_2x_torch(name, a, b, c, dtype)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,r,d", [(7, 3, 5, 40), (1, 1, 3, 24), (123, 16, 3, 24)])
def test_layer_matches_reference(T, N, r, d, dtype, device):
    spec = make_spec(N, r, d, activation="gelu", ln_eps=1e-5)
    P0 = make_params(N, r, d, dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(T, d, generator=g, dtype=torch.float64).to(device)
    x0 = torch.randn(T, d, generator=g, dtype=torch.float64).to(device)
    gout = torch.randn(T, d, generator=g, dtype=torch.float64).to(device)

    def run(fn, cast):
        P = _leaf_params(P0, cast)
        h, x = cast(h0).requires_grad_(True), cast(x0).requires_grad_(True)
        out, probs = fn(h, x, P, spec, 1.0, None)
        leaves = [h, x] + [v for v in P.__dict__.values() if v is not None]
        return out, probs, torch.autograd.grad((out.double() * gout).sum(), leaves, materialize_grads=True)  # bk cancels

    lo = lambda t: t.detach().to(dtype)  # noqa: E731
    out, probs, gs = run(_layer_fn(device), lo)
    out_t, probs_t, gs_t = run(lambda *a: fusion_layer_torch(*a), lo)
    out_r, probs_r, gs_r = run(lambda *a: fusion_layer_reference(*a), lambda t: t.detach().clone())
    assert out.dtype == dtype and probs.dtype == torch.float32
    assert_2x_torch("out", out, out_t, out_r, dtype)
    assert_2x_torch("probs", probs, probs_t, probs_r, dtype)
    names = ["h", "input_tensor"] + [k for k, v in P0.__dict__.items() if v is not None]
    for name, a, b, c in zip(names, gs, gs_t, gs_r):
        assert_2x_torch(f"d{name}", a, b, c, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_folded_inference(dtype, device):
    """Folded weights hand the row op column slices of one GEMM output (strided rows)."""
    T, N, r, d = 123, 16, 3, 40
    spec = dataclasses.replace(make_spec(N, r, d, activation="relu"), ln_eps=1e-5)
    P64 = make_params(N, r, d, dtype=torch.float64, device=device)
    P = type(P64)(**{k: None if v is None else v.to(dtype) for k, v in P64.__dict__.items()})
    g = torch.Generator().manual_seed(5)
    h = torch.randn(T, d, generator=g, dtype=torch.float64).to(device)
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(device)
    with torch.no_grad():
        out, probs = _layer_fn(device)(h.to(dtype), x.to(dtype), P, spec, 1.0, None, fold_weights(P, spec))
        out_t, probs_t = fusion_layer_torch(h.to(dtype), x.to(dtype), P, spec, 1.0, None, fold_weights(P, spec))
        out_r, probs_r = fusion_layer_reference(h, x, P64, spec, 1.0, None)
    assert_2x_torch("out", out, out_t, out_r, dtype)
    assert_2x_torch("probs", probs, probs_t, probs_r, dtype)


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
