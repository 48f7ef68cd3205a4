"""Triton backend (afkern.backends.triton_ops, kernels/) against the torch fast path and the float64 reference.

Runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it before triton is first
imported), and on CUDA tensors with real compilation when AFKERN_TEST_GPU=1 on a GPU machine.
Every kernel is compared on odd shapes (T = 1, 3, 5, 7, 9; d = 24, 32, 40, 160, 768, 1024;
r = 1, 3, 5, 80; N = 1, 2, 3, 16, 64) in outputs and in every gradient (h, input_tensor, LayerNorm weight/bias, query, key,
value, adapters). Judge: the error against the float64 reference is at most 2x the error of the
reference itself run in the same dtype, plus a small per-dtype floor (STYLE.md habit 7). The
baseline is the naive reference (``afkern.ops.reference``), never the torch fast path: that path
shares the prologue, the fold and ``shared_score`` with this backend, so a bug there would raise
its own bound. Fusion probabilities in 16 bits are checked to float32 accuracy
(``tests/exact_probs.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import afkern

from afkern.activations import KERNEL_ACTIVATIONS
from afkern.ops.fold import fold_weights
from afkern.ops.layer import Primitives, fusion_layer
from afkern.ops.reference import fusion_layer_reference
from afkern.ops.rowop import rowop_backward, rowop_forward

from conftest import make_params, make_spec
from exact_probs import check_layer_probs
from parity import CONFIGS, judge, judge_all, judge_block, run_layer

pytestmark = pytest.mark.usefixtures("one_thread")

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
if INTERP:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover - only without conftest's TRITON_INTERPRET and without a GPU
    pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytest.importorskip("triton")
from afkern.backends import triton_ops  # noqa: E402
from afkern.kernels import add_norm as KN, rowop as KR  # noqa: E402

#: the configs the Triton layer runs on (tests/parity.py CONFIGS)
TRITON_CONFIGS = ["dynamic", "static", "no_query", "no_key", "residual_before", "query_before_ln",
                  "residual_after_ln", "residual_post_add", "houlsby", "no_ln_after", "single_adapter"]


def _inputs(T, d, dtype, seed=1, grad=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g, dtype=torch.float64)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    return [t.to(DEVICE, dtype).requires_grad_(grad) for t in (h, x)]


def _params(cfg, N, r, d, dtype, seed=0):
    P = make_params(N, r, d, dtype=torch.float64, seed=seed, value=cfg.get("value", True),
                    query=cfg.get("query", True), key=cfg.get("key", True))
    return dataclasses.replace(P, **{k: (None if v is None else v.to(DEVICE, dtype)) for k, v in P.__dict__.items()})


def _run(fn, h, x, P, spec, it, M, dgrad, folded=None):
    """(out, probs, {name: grad}) of one layer call with fresh leaves; the loss reaches the output
    (cotangent ``dgrad``) and the returned fusion probabilities (tests/parity.py ``run_layer``)."""
    return run_layer(fn, h, x, P, spec, it, M, folded, dout=dgrad)


def _close(name, got, ref64, base, dtype):
    """The 2x rule (tests/parity.py): ``base`` is the reference run in the same dtype (or another
    implementation that shares no code with the one judged)."""
    judge(name, got, base, ref64, dtype)


def _compare_layer(T, N, r, d, dtype, cfg, it=0.7, dropout=False, seed=0):
    spec = make_spec(N, r, d, ln_eps=1e-5, **cfg)
    P = _params(cfg, N, r, d, dtype, seed)
    P64 = dataclasses.replace(P, **{k: (None if v is None else v.double()) for k, v in P.__dict__.items()})
    h, x = _inputs(T, d, dtype, seed + 1)
    M = None
    if dropout and spec.fusion:
        g = torch.Generator().manual_seed(seed + 2)
        M = ((torch.rand(T, N, generator=g) >= 0.3).float() / 0.7).to(DEVICE)
    dgrad = torch.randn(T, d, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64).to(DEVICE)
    ref = _run(fusion_layer_reference_7, h.double(), x.double(), P64, spec, it, M, dgrad)
    low = _run(fusion_layer_reference_7, h, x, P, spec, it, M, dgrad)  # the oracle in this dtype
    tri = _run(triton_ops.layer, h, x, P, spec, it, M, dgrad)
    assert tri[0].dtype == dtype and tri[0].shape == (T, d)
    _close("out", tri[0], ref[0], low[0], dtype)
    if spec.fusion:
        assert tri[1].dtype == torch.float32 and tri[1].shape == (T, N)
        _close("probs", tri[1], ref[1], low[1], torch.float32 if dtype == torch.float32 else dtype)
    else:
        assert tri[1] is None
    judge_all("d", tri[2], low[2], ref[2], dtype)


def fusion_layer_reference_7(h, x, P, spec, it, M, folded=None):
    return fusion_layer_reference(h, x, P, spec, it, M)


# ------------------------------------------------------------------------------------------ layer


@pytest.mark.parametrize("name", TRITON_CONFIGS)
def test_layer_configs_float32(name):
    _compare_layer(7, 3, 5, 40, torch.float32, CONFIGS[name], dropout=name in ("dynamic", "residual_before", "no_key"))


@pytest.mark.parametrize("T,N,r,d", [(1, 1, 3, 24), (9, 16, 3, 24), (3, 64, 1, 32), (5, 2, 80, 160)])
def test_layer_shapes_float32(T, N, r, d):
    # r = 1 and 3 (padded r-tiles), r = 80 > 64 (loop over r-tiles), N = 1 and 64, odd T and d
    _compare_layer(T, N, r, d, torch.float32, dict(activation="gelu"), dropout=N > 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["dynamic", "residual_before", "static"])
def test_layer_half_precision(dtype, name):
    _compare_layer(7, 3, 5, 40, dtype, CONFIGS[name], dropout=name == "dynamic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["dynamic", "residual_before", "query_before_ln", "static", "no_query",
                                  "residual_post_add"])
def test_layer_folded_inference(dtype, name):
    """Folded weights (afkern.ops.fold) through the Triton core against the float64 reference."""
    T, N, r, d = 7, 3, 5, 40
    cfg = CONFIGS[name]
    spec = make_spec(N, r, d, ln_eps=1e-5, **cfg)
    P = _params(cfg, N, r, d, dtype)
    h, x = _inputs(T, d, dtype, grad=False)
    with torch.no_grad():
        folded = fold_weights(P, spec)
        ref, pref = fusion_layer_reference(h.double(), x.double(),
                                           dataclasses.replace(P, **{k: (None if v is None else v.double())
                                                                     for k, v in P.__dict__.items()}), spec, 0.5)
        low, plow = fusion_layer_reference(h, x, P, spec, 0.5)
        tri, ptri = triton_ops.layer(h, x, P, spec, 0.5, None, folded)
    _close("folded out", tri, ref, low, dtype)
    _close("folded probs", ptri, pref, plow, dtype if dtype != torch.float32 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_probabilities_float32_accurate_in_half_precision(dtype):
    """Scores, softmax (the core's softmax kernel) and p stay float32 in a 16-bit layer, training
    (with and without score dropout) and folded (tests/exact_probs.py)."""
    check_layer_probs("triton", triton_ops.layer, dtype, device=DEVICE, fold=fold_weights)


def test_layer_inputs_noncontiguous_and_errors():
    T, N, r, d = 5, 3, 4, 24
    spec = make_spec(N, r, d)
    P = _params({}, N, r, d, torch.float32)
    h, x = _inputs(T, d, torch.float32, grad=False)
    ht = h.t().contiguous().t()  # same values, column-major
    assert not ht.is_contiguous()
    with torch.no_grad():
        a, _ = triton_ops.layer(ht, x, P, spec)
        b, _ = triton_ops.layer(h, x, P, spec)
    assert torch.equal(a, b)
    # dtypes and shapes are checked once, by the registry and the block, for every backend
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        afkern.resolve_backend("triton", h.device, spec, torch.float64)
    blk = afkern.FusedAdapterBlock(d, ["a", "b", "c"], backend="triton").double()
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        blk(h.double(), x.double())
    with pytest.raises(ValueError, match=r"\[tokens, 24\]"):
        blk.float()(h[:, :20], x)
    with pytest.raises(ValueError, match="no fused-kernel implementation"):
        triton_ops.layer(h, x, P, make_spec(N, r, d, activation="mish"))


# ------------------------------------------------------------------------------------------ row op


@pytest.mark.parametrize("act", list(KERNEL_ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowop_kernels_match_contract(act, dtype):
    T, N, r = 7, 3, 5
    g = torch.Generator().manual_seed(3)
    rn = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    Z, A, sb = rn(T, N * r), rn(T, N * r), rn(T, N)
    M = ((torch.rand(T, N, generator=g) >= 0.25).float() / 0.75).to(DEVICE)
    Y, p = KR.rowop_forward_triton(Z, A, sb, N, act, 0.6, M)
    Y0, p0 = rowop_forward(Z, A, sb, N, act, 0.6, M)  # the contract in this dtype: the baseline
    up = lambda *ts: [t.double() for t in ts]  # noqa: E731
    Y64, p64 = rowop_forward(*up(Z, A, sb), N, act, 0.6, M)  # the same values in float64: the truth
    _close("Y", Y, Y64, Y0, dtype)
    assert p.dtype == p0.dtype == torch.float32
    _close("p", p, p64, p0, torch.float32)  # the probabilities are float32-accurate in every storage dtype
    dY, dp = rn(T, N * r), torch.randn(T, N, generator=g).to(DEVICE)
    got = KR.rowop_backward_triton(dY, dp, Z, A, p0, N, act, 0.6, M, return_y=True)
    want = rowop_backward(dY, dp, Z, A, p0, N, act, 0.6, M)
    truth = rowop_backward(*up(dY, dp, Z, A, p0), N, act, 0.6, M)
    for name, a, b, t in zip(("dZ", "dA", "dsb"), got[:3], want, truth):
        assert a.dtype == b.dtype, name
        _close(name, a, t, b, dtype)
    _close("Y (backward)", got[3], Y64, Y0, dtype)


def test_rowop_autograd_fallback_path():
    """fusion_layer with the Triton row op and add+LN as its building blocks."""
    T, N, r, d = 7, 3, 5, 40
    spec = make_spec(N, r, d, ln_eps=1e-5, activation="quick_gelu")
    P = _params({}, N, r, d, torch.float32)
    h, x = _inputs(T, d, torch.float32)
    M = ((torch.rand(T, N, generator=torch.Generator().manual_seed(5)) >= 0.3).float() / 0.7).to(DEVICE)
    dgrad = torch.randn(T, d, dtype=torch.float64).to(DEVICE)

    def fb(hh, xx, PP, sp, it, MM, folded=None):
        return fusion_layer(hh, xx, PP, sp, Primitives(rowop=KR.rowop_triton, add_norm=KN.add_layer_norm_triton), it, MM)

    P64 = dataclasses.replace(P, **{k: (None if v is None else v.double()) for k, v in P.__dict__.items()})
    a = _run(fb, h, x, P, spec, 0.8, M, dgrad)
    b = _run(fusion_layer_reference_7, h.double(), x.double(), P64, spec, 0.8, M, dgrad)  # float64 oracle
    c = _run(fusion_layer_reference_7, h, x, P, spec, 0.8, M, dgrad)  # the oracle in float32
    _close("out", a[0], b[0], c[0], torch.float32)
    _close("probs", a[1], b[1], c[1], torch.float32)
    for name in b[2]:
        _close(f"d{name}", a[2][name], b[2][name], c[2][name], torch.float32)


# ------------------------------------------------------------------------------------------ add + LN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,res,affine", [(24, True, True), (40, False, True), (768, True, False), (1024, True, True)])
def test_add_layer_norm(dtype, d, res, affine):
    T = 7
    g = torch.Generator().manual_seed(d)
    rn = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc)  # noqa: E731
    x64, r64 = rn(T, d) + 0.5, rn(T, d)
    w64, b64 = (1 + rn(d, sc=0.2), rn(d, sc=0.2)) if affine else (None, None)
    dy = rn(T, d)

    def run(fn, cast):
        ts = [t if t is None else cast(t).requires_grad_(True) for t in (x64, r64 if res else None, w64, b64)]
        y = fn(ts[0], ts[1], ts[2], ts[3], 1e-5)
        leaves = [t for t in ts if t is not None]
        return [y] + list(torch.autograd.grad(y, leaves, cast(dy)))

    def torch_ln(x, r, w, b, eps):
        return F.layer_norm(x + r if r is not None else x, (d,), w, b, eps)

    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    ref = run(torch_ln, lambda t: t.to(DEVICE))
    tor = run(torch_ln, to)
    tri = run(KN.add_layer_norm_triton, to)
    for i, (a, b, c) in enumerate(zip(tri, ref, tor)):
        assert a.dtype == dtype
        _close(f"add_ln[{i}]", a, b, c, dtype)


# ------------------------------------------------------------------------------------------ end to end


def test_block_triton_matches_reference():
    import afkern

    torch.manual_seed(0)
    blk = afkern.FusedAdapterBlock(40, ["a", "b", "c"], in_features=40).to(DEVICE)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hs = torch.randn(2, 5, 40, device=DEVICE)
    it = torch.randn(2, 5, 40, device=DEVICE)
    dout = torch.randn(2, 5, 40, device=DEVICE)
    judge_block("triton", blk, hs, it, dout)  # same dropout masks (dense and score dropout) for every run


def test_patched_bert_runs_with_triton(tiny_bert_config):
    import afkern
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(tiny_bert_config).eval()
    afkern.patch_bert(model, ["a", "b"], backend="torch")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("down_", "up_", "query", "key", "value")):
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(DEVICE)
    ids = torch.randint(0, tiny_bert_config.vocab_size, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    truth = copy.deepcopy(model).double()
    afkern.set_backend(truth, "reference")
    with torch.no_grad():
        afkern.set_backend(model, "reference")  # the oracle, not the torch path it shares code with
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        afkern.set_backend(model, "triton")
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        y64 = truth(input_ids=ids, attention_mask=mask).last_hidden_state
    assert all(b.resolved_backend() == "triton" for _, b in afkern.patching.fused_blocks(model))
    judge("last hidden state", got, want, y64)


@pytest.mark.skipif(DEVICE != "cuda", reason="BERT-base width on the GPU only (the interpreter is too slow)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_layer_bert_base_width_gpu(dtype):
    _compare_layer(123, 16, 48, 768, dtype, dict(activation="relu"), dropout=True)
