"""Shared judging and layer harness of the parity tests (not a test file).

**The tolerance rule**, in one place (README "Testing"; STYLE.md habit 7; flash-attention's): a
fast path in float32 / bfloat16 / float16 is judged against a float64 *truth* computed in the same
test, next to a *baseline* (AdapterHub, or afkern's naive reference) run in the same low dtype::

    ||got - truth|| <= 2 * ||baseline - truth|| + floor(dtype) * ||truth||,
    floor(dtype) = max(FLOOR_ULPS * eps(float32), FLOOR_EPS16 * eps(dtype))

(Frobenius norms in float64). No fixed float32 number tuned on one machine: how a CPU rounds
(vector width, BLAS kernel, thread count) moves the baseline's error and the bound with it. The
floor (32 float32 ulps relative to the truth, 3.8e-6) covers what one float32 sample of rounding
noise does not: a gradient that sums many terms of both signs (the softmax's dscores sum to zero)
is off by a random walk whose size differs between two summation orders by up to 4x (measured:
the fusion's query/key gradients of a 7-token block, the reference path 4x worse than the torch
path on one seed and 3x better on another). A bug moves a result by 1e-3 or more. In 16 bits the
floor is 4 eps of the dtype (bfloat16 3.1e-2, float16 3.9e-3): a 16-bit kernel rounds at other
points than the reference (its own casts of the GEMM inputs), the same size as the baseline's
own error; the 16-bit probabilities are held to float32 accuracy separately
(tests/exact_probs.py). In
float64 the paths compute the same function and agree to ``F64_TOL`` relative (``assert_f64``).
``judge`` picks the rule from the tested tensor's dtype.

The layer harness: ``CONFIGS`` (the AdapterHub flag combinations every backend is run on) and
``run_layer`` (one layer call on fresh leaves: output, fusion probabilities, and the gradient of
every leaf under a loss on *both* returned tensors, so a backward that drops the probabilities'
gradient is caught).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Dict, Optional

import torch

#: the floor relative to ||truth||: in float32 ulps (machine epsilon) ...
FLOOR_ULPS = 32.0
#: ... and, in 16 bits, in ulps of the dtype
FLOOR_EPS16 = 4.0


def floor_for(dtype: torch.dtype) -> float:
    """The 2x rule's floor relative to ||truth|| for a result in ``dtype``."""
    return max(FLOOR_ULPS * torch.finfo(torch.float32).eps, FLOOR_EPS16 * torch.finfo(dtype).eps)
#: float64 paths agree to this relative (Frobenius) error
F64_TOL = 1e-9
#: AFKERN_PARITY_REPORT=1: print every 2x judgment's margin (error / bound) to stderr (pytest -s)
REPORT = os.environ.get("AFKERN_PARITY_REPORT") == "1"


def _report(name, err, bound):
    if REPORT:
        print(f"[2x] {err / max(bound, 1e-300):6.3f} of the bound: {name}", file=sys.stderr)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _as_tensor(t, like):
    return torch.zeros_like(like) if t is None else t


def assert_2x(name: str, got, baseline, truth, dtype: Optional[torch.dtype] = None):
    """The 2x rule above; ``dtype`` (default ``got``'s) sets the floor. A missing ``got`` or
    ``baseline`` (no gradient path) counts as zeros; a missing ``truth`` requires ``got`` to be
    missing or zero."""
    if truth is None:
        assert got is None or float(got.detach().abs().max()) == 0.0, f"{name}: expected no gradient, got one"
        return
    truth = truth.detach().double()
    got, baseline = _as_tensor(got, truth).detach(), _as_tensor(baseline, truth).detach()
    assert tuple(got.shape) == tuple(truth.shape), f"{name}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}"
    dtype = dtype or got.dtype
    scale = truth.norm().item()
    err = (got.double() - truth).norm().item()
    berr = (baseline.double() - truth).norm().item()
    floor = floor_for(dtype) * scale
    _report(name, err, 2 * berr + floor)
    assert err <= 2 * berr + floor, (
        f"{name} ({dtype}): error {err:.3g} against the float64 truth > 2 x the baseline's {berr:.3g} "
        f"+ floor {floor:.3g} (relative: {err / max(scale, 1e-300):.3g} vs {berr / max(scale, 1e-300):.3g})")


def assert_2x_all(name: str, items: Dict[str, tuple], dtype: Optional[torch.dtype] = None):
    """The 2x rule for a set of tensors judged as one flat vector (``items``: {what: (got,
    baseline, truth)}), as an optimizer sees a model's gradient: a small tensor's own rounding
    error (a bias of 3 entries) is one noisy sample, so its error alone against 2x the baseline's
    is a coin toss, while a wrong gradient, even of one small tensor, moves the whole vector far
    beyond rounding. The message names the tensors whose relative error is worst."""
    rows = []
    for what, (got, base, truth) in items.items():
        if truth is None:
            assert_2x(f"{name}: {what}", got, base, truth)
            continue
        t = truth.detach().double().reshape(-1)
        g, b = _as_tensor(got, truth).detach().double().reshape(-1), _as_tensor(base, truth).detach().double().reshape(-1)
        assert g.numel() == t.numel(), f"{name}: {what}: {g.numel()} entries, expected {t.numel()}"
        rows.append((what, g, b, t))
        dtype = dtype or (got.dtype if got is not None else base.dtype)
    if not rows:
        return
    g, b, t = (torch.cat([r[i] for r in rows]) for i in (1, 2, 3))
    scale = t.norm().item()
    err, berr = (g - t).norm().item(), (b - t).norm().item()
    floor = floor_for(dtype) * scale
    _report(name, err, 2 * berr + floor)
    if err > 2 * berr + floor:
        worst = sorted(rows, key=lambda r: -((r[1] - r[3]).norm() / r[3].norm().clamp_min(1e-300)).item())[:3]
        detail = ", ".join(f"{w}: {rel_err(gg, tt):.3g} vs {rel_err(bb, tt):.3g}" for w, gg, bb, tt in worst)
        raise AssertionError(
            f"{name} ({dtype}, {len(rows)} tensors): error {err:.3g} against the float64 truth > 2 x the "
            f"baseline's {berr:.3g} + floor {floor:.3g}; worst relative errors (tested vs baseline): {detail}")


def assert_f64(name: str, got, truth, tol: float = F64_TOL):
    """float64: relative Frobenius error at most ``tol``; where one side is missing (no gradient
    path), the other must be zero to ``tol``."""
    if got is None or truth is None:  # one path has no gradient (the math cancels it): the other ~0
        other = truth if got is None else got
        assert other is None or float(other.detach().abs().max()) <= tol, (
            f"{name}: one path has no gradient, the other one of max {float(other.detach().abs().max()):.3g}")
        return
    truth, got = truth.detach().double(), got.detach()
    assert tuple(got.shape) == tuple(truth.shape), f"{name}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}"
    scale = truth.norm().item()
    err = (got.double() - truth).norm().item()
    assert err <= tol * max(scale, 1e-300) or (scale == 0.0 and err <= tol), (
        f"{name} (float64): relative error {err / max(scale, 1e-300):.3g} > {tol:.0e} against the truth")


def judge(name: str, got, baseline, truth, dtype: Optional[torch.dtype] = None):
    """float64 ``got``: ``assert_f64`` against ``truth``; otherwise the 2x rule."""
    dtype = dtype or (got.dtype if got is not None else baseline.dtype if baseline is not None else truth.dtype)
    if dtype == torch.float64:
        assert_f64(name, got, truth)
    else:
        assert_2x(name, got, baseline, truth, dtype)


def judge_all(prefix: str, got: Dict, baseline: Dict, truth: Dict, dtype: torch.dtype):
    """Every key of ``truth`` (gradients by leaf name): float64 each to ``F64_TOL``; a low dtype by
    the 2x rule on all of them as one vector (``assert_2x_all``: one step's gradient)."""
    if dtype == torch.float64:
        for k, t in truth.items():
            assert_f64(f"{prefix}{k}", got.get(k), t)
    else:
        assert_2x_all(f"{prefix.strip() or 'gradients'}",
                      {f"{prefix}{k}": (got.get(k), baseline.get(k), t) for k, t in truth.items()}, dtype)


# ------------------------------------------------------------------------------ the layer harness

#: AdapterHub flag combinations (``afkern.ops.params.LayerSpec`` fields; value / query / key say
#: whether the fusion has those maps)
CONFIGS = {
    "dynamic": dict(),
    "static": dict(value=False),
    "no_query": dict(query=False),
    "no_key": dict(key=False),
    "no_qkv": dict(query=False, key=False, value=False),
    "residual_before": dict(residual_before=True),
    "residual_before_static": dict(residual_before=True, value=False),
    "query_before_ln": dict(query_before_ln=True),
    "residual_after_ln": dict(residual_before_ln=False),
    "residual_post_add": dict(residual_before_ln="post_add"),
    "houlsby": dict(original_ln_before=False, activation="silu"),
    "no_ln_after": dict(original_ln_after=False, activation="gelu_tanh"),
    "single_adapter": dict(fusion=False, active=1),
}

def cotangents(out: torch.Tensor, probs: Optional[torch.Tensor], seed: int = 7):
    """Fixed random cotangents for the output and the probabilities (float64, ``out``'s device)."""
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    dprobs = None if probs is None else torch.randn(probs.shape, generator=g, dtype=torch.float64).to(probs.device)
    return dout, dprobs


def run_layer(fn: Callable, h: torch.Tensor, x: torch.Tensor, P, spec, *args, grad: bool = True,
              dout: Optional[torch.Tensor] = None, dprobs: Optional[torch.Tensor] = None, probs_grad: bool = True,
              seed: int = 7):
    """``fn(h, x, P, spec, *args) -> (out, probs)`` on fresh leaves; returns ``(out, probs, grads)``
    with ``grads`` the gradient of every leaf (``h``, ``input_tensor`` and each parameter of ``P``,
    ``None`` where no path reaches it) under ``sum(out * dout) + sum(probs * dprobs)``. Cotangents
    default to ``cotangents(out, probs, seed)``; ``probs_grad=False`` leaves the probabilities out of
    the loss; ``grad=False`` runs under no_grad and returns no gradients."""
    hh, xx = h.detach().clone().requires_grad_(grad), x.detach().clone().requires_grad_(grad)
    PP = dataclasses.replace(P, **{f.name: (None if getattr(P, f.name) is None
                                            else getattr(P, f.name).detach().clone().requires_grad_(grad))
                                   for f in dataclasses.fields(P)})
    if not grad:
        with torch.no_grad():
            out, probs = fn(hh, xx, PP, spec, *args)
        return out, probs, {}
    out, probs = fn(hh, xx, PP, spec, *args)
    d_out, d_probs = cotangents(out, probs, seed)
    d_out = d_out if dout is None else dout
    d_probs = d_probs if dprobs is None else dprobs
    loss = (out.double() * d_out.double()).sum()
    if probs is not None and probs_grad and probs.requires_grad:
        loss = loss + (probs.double() * d_probs.double()).sum()
    leaves = {"h": hh, "input_tensor": xx}
    leaves.update({f.name: getattr(PP, f.name) for f in dataclasses.fields(PP) if getattr(PP, f.name) is not None})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return out, probs, dict(zip(leaves, grads))


# ------------------------------------------------------------------------------ the block harness


def run_block(blk, backend: str, hs: torch.Tensor, it: torch.Tensor, dout: torch.Tensor, seed: int = 123,
              adapter_forward: bool = False):
    """One training step and one inference forward of ``blk`` on ``backend``: ``(out, {input
    grads}, {parameter grads}, inference out)``. torch's RNG is seeded before the step, so every
    backend (and a float64 copy: the masks are drawn alike in every dtype) sees the same dropout
    and score-dropout masks. ``adapter_forward``: call ``blk.adapter_forward`` (a hooked site)."""
    fn = blk.adapter_forward if adapter_forward else blk
    blk.set_backend(backend).train()
    blk.zero_grad(set_to_none=True)
    hh, ii = hs.detach().clone().requires_grad_(True), it.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = fn(hh, ii)
    (out * dout.to(out.dtype)).sum().backward()
    grads = {k: p.grad.clone() for k, p in blk.named_parameters() if p.grad is not None}
    blk.eval()
    with torch.no_grad():  # inference: the folded weights
        inf = fn(hs, it)
    return out.detach(), {"hidden_states": hh.grad, "input_tensor": ii.grad}, grads, inf


def judge_block(backend: str, blk, hs, it, dout, baseline: str = "reference", adapter_forward: bool = False):
    """``backend`` against the float64 truth (a float64 copy of ``blk`` on the reference backend)
    by the 2x rule, with ``baseline`` in ``blk``'s dtype: output, input gradients, every parameter
    gradient (one vector) and the inference output."""
    import copy

    truth = run_block(copy.deepcopy(blk).double(), "reference", hs.double(), it.double(), dout.double(),
                      adapter_forward=adapter_forward)
    base = run_block(blk, baseline, hs, it, dout, adapter_forward=adapter_forward)
    got = run_block(blk, backend, hs, it, dout, adapter_forward=adapter_forward)
    dtype = hs.dtype
    judge(f"{backend} out", got[0], base[0], truth[0], dtype)
    assert set(got[2]) <= set(truth[2]), f"{backend}: gradients for {sorted(set(got[2]) - set(truth[2]))} only"
    grads = {k: (got[1][k], base[1][k], t) for k, t in truth[1].items()}
    grads.update({k: (got[2].get(k), base[2].get(k), t) for k, t in truth[2].items()})
    assert_2x_all(f"{backend} gradients (inputs and parameters)", grads, dtype)
    judge(f"{backend} inference out", got[3], base[3], truth[3], dtype)


# ------------------------------------------------------------------------------ models and round trips


def cast_floats(x, dtype: torch.dtype):
    """``x`` (a tensor, or a tuple / list / dict of them) with every floating tensor cast to
    ``dtype``; token ids, masks and other values unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: cast_floats(v, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(cast_floats(v, dtype) for v in x)
    return x


def _call(module, inputs):
    return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


def _tensor_of(y):
    """A model's output as one tensor: a tensor itself, or ``last_hidden_state`` / ``logits``."""
    if isinstance(y, torch.Tensor):
        return y
    for k in ("last_hidden_state", "logits"):
        v = getattr(y, k, None)
        if v is not None:
            return v
    return y[0]


def _reference_copy(module, dtype: torch.dtype):
    import copy

    import afkern

    m = copy.deepcopy(module).to(dtype)
    if any(isinstance(b, afkern.FusedAdapterBlock) for b in m.modules()):
        afkern.set_backend(m, "reference")
    return m


def f64_truth(module, inputs, pick: Callable = _tensor_of, dtype: torch.dtype = torch.float64):
    """The float64 truth of ``module(inputs)``: a deep copy of ``module`` cast to float64 (on
    afkern's reference backend where it holds fused blocks), called under no_grad on ``inputs``
    cast to float64. ``module`` itself is not touched. ``dtype=torch.float32``: the same in float32,
    the 2x rule's baseline where the path judged (a compiled graph, an export) shares afkern's fast
    path with ``module`` itself."""
    m = _reference_copy(module, dtype)
    with torch.no_grad():
        return pick(_call(m, cast_floats(inputs, dtype))).detach()


def judge_backends(name: str, module, inputs, backend: str = "torch", baseline: str = "reference",
                   pick: Callable = _tensor_of, truth: Optional[torch.Tensor] = None):
    """``module`` (holding fused blocks) on ``backend`` against the float64 truth (``f64_truth``
    unless given), by the rule of its dtype (``judge``), with ``baseline`` in the same dtype as the
    2x rule's baseline. Runs under no_grad; leaves ``module`` on ``backend``; returns its output."""
    import afkern

    truth = f64_truth(module, inputs, pick=pick) if truth is None else truth
    with torch.no_grad():
        base = pick(_call(afkern.set_backend(module, baseline), inputs))
        got = pick(_call(afkern.set_backend(module, backend), inputs))
    judge(name, got, base, truth)
    return got


def assert_same(name: str, got, expected):
    """Bit-exact equality (same weights through the same code give the same bits): a save and
    reload, a copy, a round trip. Tensors, or dicts of them (the same keys)."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), f"{name}: keys {sorted(set(got) ^ set(expected))} differ"
        for k in expected:
            assert_same(f"{name}: {k}", got[k], expected[k])
        return
    got, expected = _tensor_of(got), _tensor_of(expected)
    assert got.shape == expected.shape and got.dtype == expected.dtype, (
        f"{name}: {tuple(got.shape)} {got.dtype}, expected {tuple(expected.shape)} {expected.dtype}")
    if not torch.equal(got, expected):
        diff = (got.double() - expected.double()).abs().max().item()
        raise AssertionError(f"{name}: not bit-exact (max difference {diff:.3g}, relative {rel_err(got, expected):.3g})")


def assert_rounding_bound(name: str, got, truth, terms: int, scale: Optional[float] = None,
                          dtype: Optional[torch.dtype] = None):
    """Where no same-dtype baseline exists: ``||got - truth|| <= terms * eps(dtype) * scale``, the
    worst-case bound of a computation of ``terms`` roundings on values of size ``scale`` (Higham's
    gamma_n: a sum or dot product of n terms in floating point is off by at most about
    n * eps * sum|x_i|). ``scale`` defaults to ``||truth||`` (a sum of terms of one sign)."""
    truth = truth.detach().double() if isinstance(truth, torch.Tensor) else torch.tensor(float(truth), dtype=torch.float64)
    got = got.detach() if isinstance(got, torch.Tensor) else torch.tensor(float(got))
    dtype = dtype or got.dtype
    scale = truth.norm().item() if scale is None else scale
    err = (got.double() - truth).norm().item()
    bound = terms * torch.finfo(dtype).eps * scale
    assert err <= bound, f"{name} ({dtype}): error {err:.3g} against the float64 truth > {terms} roundings' bound {bound:.3g}"


def f64_step(module, inputs, loss: Callable = lambda y: y.pow(2).mean(), pick: Callable = _tensor_of,
             dtype: torch.dtype = torch.float64):
    """The float64 truth of one training step: a float64 copy of ``module`` (afkern's reference
    backend where it holds fused blocks) run on ``inputs`` cast to float64; returns ``(output,
    {parameter name: gradient or None})`` of ``loss(output)``. ``dtype``: as in ``f64_truth``."""
    m = _reference_copy(module, dtype)
    m.zero_grad(set_to_none=True)
    y = pick(_call(m, cast_floats(inputs, dtype)))
    loss(y).backward()
    return y.detach(), {k: (None if p.grad is None else p.grad.detach()) for k, p in m.named_parameters()}


def assert_2x_errors(name: str, err: float, base_err: float, dtype: torch.dtype):
    """The 2x rule on relative errors measured elsewhere (a benchmark row's ``rel_err`` and
    ``ref_rel_err``, both against its float64 oracle): ``err <= 2 * base_err + floor(dtype)``."""
    bound = 2 * base_err + floor_for(dtype)
    assert err <= bound, f"{name} ({dtype}): relative error {err:.3g} > 2 x the baseline's {base_err:.3g} + floor"
