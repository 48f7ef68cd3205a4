"""The correctness guard: a provider is timed only if it computes the benchmarked function.

Judge: a float64 run of afkern's ``reference`` path (the naive per-adapter formulation, on the
same weights -- those of the run's dtype, upcast -- and the same inputs upcast), the
*oracle*. Compared quantities, each as the relative error ``||a - exact|| / ||exact||``
(computed in float64):

* the output of a ``no_grad`` call and of a grad-enabled call;
* in gradient modes, the gradient of every input, and of every fusion tensor (query/key weight
  and bias, value weight of every fused site). Some of those are exactly zero in exact arithmetic
  (the key bias shifts every score equally; with N = 1 the softmax is constant), so their error is
  measured against ``max(||exact||, 1% of the largest fusion gradient)``.

Rule, per quantity q (as the parity tests judge the fast path): with ``e_ref(q)`` the error of
the ``reference`` path run in the benchmark's dtype against the oracle,

    e_provider(q) <= max(2 * e_ref(q), FLOOR[dtype])

FLOOR (float64 1e-10, float32 1e-5, float16 2e-3, bfloat16 1e-2) keeps a provider from failing
because the reference happens to be luckier than the rounding of its dtype. The bound grows with
the conditioning of the case: at N = 64 over 12 layers, float32 rounding alone gives errors of
about 1e-3 (the reference path's as much as AdapterHub's), where a fixed tolerance would refuse
correct providers. The recorded ``rel_err`` is the provider's worst error against the oracle,
``ref_rel_err`` the reference path's. A provider that fails, raises or cannot run is reported
with its status and not timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .models import Setup
from .providers import Runner, afkern_runner

__all__ = ["FLOOR", "floor_for", "Evaluation", "Oracle", "evaluate", "rel_err", "errors_against", "make_oracle", "check_provider"]

FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FUSION_GRAD_FLOOR = 1e-2  # fraction of the largest fusion gradient's norm (module doc)


def floor_for(dtype: torch.dtype) -> float:
    """FLOOR of a dtype (a dtype not listed gets the loosest, bfloat16's)."""
    return FLOOR.get(dtype, FLOOR[torch.bfloat16])


class GuardMismatch(ValueError):
    """The provider's results cannot be compared with the oracle's (different structure)."""


def rel_err(a: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``||a - ref|| / max(||ref||, floor)`` in float64 (inf on a shape mismatch or non-finite)."""
    a, ref = a.detach().double(), ref.detach().double()
    if a.shape != ref.shape:
        return float("inf")
    num = (a - ref).norm().item()
    if not math.isfinite(num):
        return float("inf")
    denom = max(ref.norm().item(), floor)
    return num / denom if denom > 0 else num


@dataclass
class Evaluation:
    """A provider's results on one case: outputs (``no_grad``; grad-enabled), input gradients and
    fusion-tensor gradients (empty outside gradient modes)."""

    outputs: List[torch.Tensor]
    input_grads: List[torch.Tensor] = field(default_factory=list)
    fusion_grads: List[torch.Tensor] = field(default_factory=list)


def evaluate(runner: Runner, inputs: Sequence[torch.Tensor], dy: torch.Tensor, grads: bool) -> Evaluation:
    """Run ``runner`` once without and (if ``grads``) once with autograd, back-propagating ``dy``."""
    with torch.no_grad():
        outputs = [runner.fn(*inputs).detach().clone()]
    if not grads:
        return Evaluation(outputs)
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    for p in runner.fusion_params:
        p.grad = None
    out = runner.fn(*xs)
    out.backward(dy)
    fusion = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in runner.fusion_params]
    for p in runner.fusion_params:
        p.grad = None
    return Evaluation(outputs + [out.detach().clone()], [x.grad.detach().clone() for x in xs], fusion)


def errors_against(ev: Evaluation, exact: Evaluation) -> List[Tuple[str, float]]:
    """(quantity, relative error) of every quantity of ``ev`` against ``exact`` (module doc);
    :class:`GuardMismatch` if they do not have the same quantities."""
    if (len(ev.outputs), len(ev.input_grads), len(ev.fusion_grads)) != (
            len(exact.outputs), len(exact.input_grads), len(exact.fusion_grads)):
        raise GuardMismatch(f"{len(ev.fusion_grads)} fusion gradients, the reference has {len(exact.fusion_grads)}")
    out = [(label, rel_err(a, b)) for label, a, b in zip(("output (no_grad)", "output"), ev.outputs, exact.outputs)]
    out += [(f"grad of input {i}", rel_err(a, b)) for i, (a, b) in enumerate(zip(ev.input_grads, exact.input_grads))]
    floor = FUSION_GRAD_FLOOR * max([g.detach().double().norm().item() for g in exact.fusion_grads] + [0.0])
    out += [(f"grad of fusion tensor {i}", rel_err(a, b, floor))
            for i, (a, b) in enumerate(zip(ev.fusion_grads, exact.fusion_grads))]
    return out


@dataclass
class Oracle:
    """The float64 results of one case and the error of the ``reference`` path in ``dtype``."""

    dtype: torch.dtype
    exact: Evaluation
    ref_errors: List[Tuple[str, float]]

    @property
    def ref_worst(self) -> float:
        return max(e for _, e in self.ref_errors)

    def bound(self, i: int) -> float:
        return max(2.0 * self.ref_errors[i][1], floor_for(self.dtype))


def make_oracle(setup: Setup, kind: str, inputs, dy, grads: bool, reference: Optional[Runner] = None) -> Oracle:
    """The oracle of one case: afkern's ``reference`` path in float64, and ``reference`` (that
    path in the run's dtype; built here if not given) measured against it."""
    if reference is None:
        reference = afkern_runner(setup, "reference", kind)
    ref_ev = evaluate(reference, inputs, dy, grads)
    if setup.dtype == torch.float64:  # the reference path is the oracle
        return Oracle(setup.dtype, ref_ev, [(q, 0.0) for q, _ in errors_against(ref_ev, ref_ev)])
    exact = evaluate(afkern_runner(setup, "reference", kind, dtype=torch.float64),
                     [t.double() for t in inputs], dy.double(), grads)
    return Oracle(setup.dtype, exact, errors_against(ref_ev, exact))


def check_provider(runner: Runner, oracle: Oracle, inputs, dy, grads: bool) -> Tuple[str, float]:
    """(status, worst relative error against the oracle): ``"ok"`` if every quantity is within its
    bound, else ``"mismatch: ..."`` naming the first quantity out of bounds."""
    ev = evaluate(runner, inputs, dy, grads)
    try:
        errs = errors_against(ev, oracle.exact)
    except GuardMismatch as exc:
        return f"mismatch: {exc}", float("inf")
    worst = max(e for _, e in errs)
    for i, (label, e) in enumerate(errs):
        bound = oracle.bound(i)
        if not e <= bound:
            return (f"mismatch: {label} rel err {e:.2e} > {bound:.1e} (2x the {str(oracle.dtype)[6:]} reference's "
                    f"{oracle.ref_errors[i][1]:.1e}, floor {floor_for(oracle.dtype):.0e})"), worst
    return "ok", worst
