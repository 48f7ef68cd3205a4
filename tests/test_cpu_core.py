"""The CPU extension ``afkern._cpu`` (csrc/cpu/folded_core.cpp): one fusion's folded core of an
inference forward in one call (the [Z | A | sb] GEMM, the row op, the output GEMMs).

The op is judged against the torch backend's core (``gemm_core`` around ``rowop_torch``, itself
tested against the row op's contract in tests/test_fusion.py) run in float64 on the same inputs:
float64 to ``F64_TOL``, float32 by the 2x rule against the torch core's own float32 error. The
scores are scaled so the softmax is far from uniform and far from one-hot (a wrong score path
shows in p). Then: the layer takes it exactly where it applies (CPU, float32 / float64, gradients
off, no autocast), and a patched model's generation through it matches the torch row op's.
"""

from __future__ import annotations

import copy

import pytest
import torch

import afkern
from afkern import compiler
from afkern.backends import torch_ops
from afkern.ops.layer import CoreWeights, FoldedCall, gemm_core
from afkern.ops.limits import KERNEL_ACTIVATIONS
from afkern.ops.rowop import rowop_torch
from parity import assert_2x, assert_f64

TORCH_CORE = gemm_core(rowop_torch)


def _ext():
    ok, why = torch_ops.cpu_extension_status()
    assert ok, f"`make venv` builds afkern._cpu (setup.py, a C++ compiler is needed): {why}"
    return torch_ops._CPU[0]


def test_extension_loads():
    assert callable(_ext().folded_core)


def _case(T, N, r, d, dtype, with_base, prior_kind, seed=0):
    """Inputs of the core in float64 (cast to ``dtype`` by the caller): x [T, d], the folded
    [d, 2 N r + N] input map (the A block scaled for a non-trivial softmax), [Wu; bu], a base,
    a prior ([N] or [T, N], one adapter off with -inf where N > 1)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    NR = N * r
    x = rn(T, d)
    w_in = rn(d, 2 * NR + N) / d ** 0.5
    w_in[:, NR:2 * NR] *= 1.5 / r ** 0.5  # scores of order 1: p neither uniform nor one-hot
    b_in = rn(2 * NR + N) * 0.3
    w_out = rn(NR + N, d) / NR ** 0.5
    base = rn(T, d) if with_base else None
    prior = None
    if prior_kind == "row":
        prior = rn(N) * 0.5
    elif prior_kind == "token":
        prior = rn(T, N) * 0.5
        if N > 1:
            prior[:, 0] = float("-inf")
    return x, w_in, b_in, w_out, base, prior


def _weights(w_in, b_in, w_out, NR):
    return CoreWeights(w_in[:, :NR], b_in[:NR], w_in[:, NR:2 * NR], b_in[NR:2 * NR], w_in[:, 2 * NR:], b_in[2 * NR:],
                       w_out[:NR], w_out[NR:], w_in=w_in, b_in=b_in)


def _run_torch(inputs, N, r, act, inv_t, dtype):
    x, w_in, b_in, w_out, base, prior = [None if t is None else t.to(dtype) for t in inputs]
    return TORCH_CORE(x, x, _weights(w_in, b_in, w_out, N * r), None, base, None, prior, N, r, act, inv_t)


def _run_ext(inputs, N, r, act, inv_t, dtype):
    x, w_in, b_in, w_out, base, prior = [None if t is None else t.to(dtype) for t in inputs]
    NR = N * r
    return _ext().folded_core(x, w_in, b_in, w_out[:NR], w_out[NR:], base, prior, N, r, KERNEL_ACTIVATIONS[act], inv_t)


SHAPES = [(1, 8, 48, 64), (7, 3, 5, 24), (5, 1, 4, 16), (2, 8, 1, 8)]  # (T, N, r, d)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", sorted(KERNEL_ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-N{}-r{}-d{}".format(*s))
def test_folded_core_matches_the_torch_core(shape, act, dtype):
    T, N, r, d = shape
    for with_base, prior_kind, inv_t in ((True, None, 1.0), (False, "row", 0.37), (True, "token", 1.7)):
        inputs = _case(T, N, r, d, torch.float64, with_base, prior_kind, seed=T + N + r)
        with torch.no_grad():
            mix_t, p_t = _run_torch(inputs, N, r, act, inv_t, torch.float64)  # the truth
            mix, p = _run_ext(inputs, N, r, act, inv_t, dtype)
            assert mix.dtype == dtype and p.dtype == dtype and p.shape == (T, N)
            name = f"{act} {shape} base={with_base} prior={prior_kind} 1/T={inv_t}"
            if N > 1 and prior_kind is None:  # the case is not trivial: p far from uniform and from one-hot
                spread = p_t.max(-1).values - p_t.min(-1).values
                assert float(spread.min()) > 0.02 and float(p_t.max()) < 0.999, (name, p_t)
            if dtype == torch.float64:
                assert_f64(f"mix {name}", mix, mix_t)
                assert_f64(f"p {name}", p, p_t)
            else:
                mix_b, p_b = _run_torch(inputs, N, r, act, inv_t, dtype)
                assert_2x(f"mix {name}", mix, mix_b, mix_t)
                assert_2x(f"p {name}", p, p_b, p_t)


def test_fixed_weights_control_gives_softmax_of_the_prior():
    """inv_temperature 0 (a fixed-weights control): p = softmax(prior) whatever the scores."""
    inputs = _case(3, 4, 6, 16, torch.float64, True, "row")
    with torch.no_grad():
        _, p = _run_ext(inputs, 4, 6, "relu", 0.0, torch.float64)
    assert_f64("p", p, torch.softmax(inputs[-1], -1).expand(3, 4))


@pytest.mark.parametrize("bad, match", [
    (dict(w_in=lambda t: t[:, :-1]), r"w_in of shape \[16, 52\]"),
    (dict(bu=lambda t: t[:-1]), r"bu of shape \[4, 16\]"),
    (dict(base=lambda t: t[:, :-1]), r"base of shape \[3, 16\]"),
    (dict(prior=lambda t: t[:-1]), r"prior of shape \[N\] or \[T, N\]"),
    (dict(x=lambda t: t.float()), r"w_in in Float"),
    (dict(x=lambda t: t.half()), r"float32 or float64 tokens, got Half"),
    (dict(code=lambda c: 9), r"unknown activation code 9"),
    (dict(N=lambda n: 0), r"N >= 1"),
])
def test_folded_core_rejects_bad_input(bad, match):
    x, w_in, b_in, w_out, base, prior = _case(3, 4, 6, 16, torch.float64, True, "row")
    args = dict(x=x, w_in=w_in, b_in=b_in, wu=w_out[:24], bu=w_out[24:], base=base, prior=prior, N=4, r=6, code=1)
    for k, f in bad.items():
        args[k] = f(args[k])
    with pytest.raises(RuntimeError, match=match):
        _ext().folded_core(args["x"], args["w_in"], args["b_in"], args["wu"], args["bu"], args["base"], args["prior"],
                           args["N"], args["r"], args["code"], 1.0)


# ------------------------------------------------------------------------------- in the layer
class _Counting:
    """Stands in for the extension module: counts the calls of its folded core."""

    def __init__(self, ext):
        self.calls, self._op = 0, ext.folded_core

    def folded_core(self, *args):
        self.calls += 1
        return self._op(*args)


@pytest.fixture
def counted(monkeypatch):
    fake = _Counting(_ext())
    monkeypatch.setattr(torch_ops, "_CPU", (fake, "ok"))
    return fake


def _block(dtype=torch.float32, activation="relu"):
    torch.manual_seed(0)
    blk = afkern.FusedAdapterBlock(32, ["a", "b", "c"], adapter_config=dict(reduction_factor=4, non_linearity=activation))
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return blk.to(dtype).eval()


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 32, generator=g).to(dtype), torch.randn(2, 5, 32, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_forward_runs_the_cpu_core(counted, dtype):
    blk = _block(dtype)
    h, x = _inputs(dtype)
    with torch.no_grad():
        out = blk(h, x)
        call = compiler._compile_active(blk, h.reshape(-1, 32))[4]
    assert counted.calls == 1 and isinstance(call, FoldedCall)
    blk_torch = copy.deepcopy(blk)  # the same forward on the torch row op
    torch_ops._CPU = (None, "off for this comparison")
    try:
        with torch.no_grad():
            ref = blk_torch(h, x)
    finally:
        torch_ops._CPU = (counted, "ok")
    assert counted.calls == 1
    if dtype == torch.float64:
        assert_f64("block out", out, ref)
    else:
        with torch.no_grad():
            truth = copy.deepcopy(blk).double()(h.double(), x.double())
        assert_2x("block out", out, ref, truth)


def test_the_cpu_core_is_not_taken_where_it_does_not_apply(counted):
    blk = _block()
    h, x = _inputs(torch.float32)
    blk(h, x)  # gradients on: the unfolded layer (training)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        blk(h, x)  # autocast: the torch core's GEMMs autocast as the plain model's
    with torch.no_grad():
        _block(torch.bfloat16)(*_inputs(torch.bfloat16))  # 16-bit storage
        _block(activation="mish")(h, x)  # an activation the kernels do not implement
    assert counted.calls == 0
    with torch.no_grad():
        blk(h, x)
    assert counted.calls == 1


def test_generation_through_the_cpu_core_matches_the_torch_row_op(counted):
    """A patched GPT-2 (a hooked family) decoding greedily with the KV cache: the same tokens
    and, by the 2x rule against the float64 model, the same logits as with the torch row op."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=64)).eval()
    model = afkern.patch_model(base, ["a", "b", "c", "d"], adapter_config="pfeiffer")
    with torch.no_grad():
        for _, blk in afkern.fused_blocks(model):
            for p in blk.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, pad_token_id=0)
        got = model(seq).logits
    assert counted.calls > 0
    plain = copy.deepcopy(model)
    torch_ops._CPU = (None, "off for this comparison")
    try:
        with torch.no_grad():
            seq_t = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                                   do_sample=False, pad_token_id=0)
            ref = plain(seq).logits
            truth = copy.deepcopy(model).double()(seq).logits
    finally:
        torch_ops._CPU = (counted, "ok")
    assert torch.equal(seq, seq_t)
    assert_2x("logits", got, ref, truth)


def test_a_frozen_fusion_under_autograd_keeps_its_gradient_path(counted):
    """Frozen adapters and fusion (folded: nothing of theirs needs a gradient) under autograd, a
    gradient wanted for the input (an earlier trainable layer, saliency): the torch core runs (the
    CPU core has no backward), and the input's gradient is the reference backend's."""
    blk = _block()
    for p in blk.parameters():
        p.requires_grad_(False)
    h, x = _inputs(torch.float32)

    def grad_h(b, dtype):
        hh = h.detach().to(dtype).requires_grad_(True)
        (g,) = torch.autograd.grad(b(hh, x.to(dtype)).pow(2).sum(), hh)
        return g

    got = grad_h(blk, torch.float32)
    assert counted.calls == 0
    ref = copy.deepcopy(blk).set_backend("reference")
    assert_2x("dL/dh", got, grad_h(ref, torch.float32), grad_h(copy.deepcopy(ref).double(), torch.float64))


def test_tracers_and_modes_see_torch_ops(counted):
    """Under a torch function or dispatch mode (op counters, fake tensors, the host-sync probe of
    tests/test_decode_step.py) and under ``torch.jit.trace`` (tests/test_export.py: the
    TorchScript ONNX exporter) the torch core runs: an extension's call would be invisible to them
    (a tracer would record its result as a constant)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    blk = _block()
    h, x = _inputs(torch.float32)
    with torch.no_grad():
        want = blk(h, x)
        assert counted.calls == 1
        with Ops() as ops:
            got = blk(h, x)
        with Calls():
            blk(h, x)
        traced = torch.jit.trace(blk, (h, x), check_trace=False)
    assert counted.calls == 1 and "aten._softmax" in ops.seen
    assert_2x("under a dispatch mode", got, want, copy.deepcopy(blk).double()(h.double(), x.double()))
    h2, x2 = _inputs(torch.float32)
    with torch.no_grad():
        assert_2x("traced, new input", traced(h2 * 2, x2), blk(h2 * 2, x2),
                  copy.deepcopy(blk).double()(2 * h2.double(), x2.double()))
