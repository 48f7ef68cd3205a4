"""Backend ``reference``: the naive per-adapter layer of ``afkern.ops.reference`` (the oracle)."""

from __future__ import annotations

from ..ops.reference import fusion_layer_reference, routed_layer_reference

__all__ = ["layer", "status"]


def status(device):
    return True, "ok"


def layer(h, input_tensor, P, spec, inv_temperature=1.0, score_scale=None, folded=None, prior=None, plan=None):
    """The oracle: the naive layer (``folded`` is ignored), or with ``plan`` each segment alone."""
    if plan is not None and plan.rows is not None:
        return routed_layer_reference(h, input_tensor, P, spec, plan)
    if plan is not None:  # one segment over every token
        f = plan.segments[0]
        inv_temperature, score_scale, prior = f.inv_temperature, f.score_scale, f.prior
        P = f.params if f.params is not None else P
        spec = f.spec
    return fusion_layer_reference(h, input_tensor, P, spec, inv_temperature, score_scale, None, prior)
