"""``afkern.accelerate(model)``: an AdapterHub model made fast in place (docs/DESIGN.md section 2).

AdapterHub's ``adapters`` 1.3.0 computes every adapter site in ``BottleneckLayer``
(``adapters/methods/bottleneck.py``)::

    bottleneck_layer_forward(h, residual_input, layer_norm):
        state = compose(active_setup, BottleneckState(h, residual_input, residual_input, layer_norm))
        return last_adapter.post_forward(state.hidden_states, h, residual_input, layer_norm)

``compose`` dispatches on the setup: a ``Fuse`` runs the last adapter's ``pre_forward``, every
child adapter (``[T, N, d]`` stack of ``up``) and ``BertFusion``; a single adapter is
``Stack(name)``: ``pre_forward`` then ``Adapter.forward``. :func:`accelerate` replaces ``compose``
of each BottleneckLayer *instance* (the class is untouched; ``enable=False`` removes the instance
attribute) by one that hands these two setups to afkern's re-associated layer
(``afkern.ops.layer.fusion_layer`` through the backend registry) with ``original_ln_after`` off,
so AdapterHub's own ``post_forward`` still does the last add + norm. It reads AdapterHub's
parameters at every forward: the fusion's query / key / value and the site's norm are used as they
are; the N adapters' projections are stacked (``[N, r, d]``), a differentiable stack when they
need gradients, else a stack cached on the version counters and storage of every source tensor
(as ``afkern.ops.fold`` caches folded weights), so an optimizer step, ``load_adapter``,
``add_adapter`` or ``set_active_adapters`` is seen at the next forward.

AdapterHub's per-call steps happen as AdapterHub does them: the temperature ``BertFusion.T``
anneals by ``reduction`` after every call; the score-dropout mask is ``BertFusion.dropout``
applied to ones of the scores' shape and dtype (the same draw under the same seed); a training
adapter's own dropout on ``up``, whose result a Fuse discards, is drawn all the same so that the
random stream stays AdapterHub's. Every other setup (``Stack`` of several, ``Parallel``,
``BatchSplit``, ``Split``, ``Average``, nested blocks) and adapters afkern does not compute
(parallel adapters, gating, adapter LayerNorms, PHM, learned scaling, stochastic depth) run on
AdapterHub's own code, said once per model in a warning naming the setup.

``afkern.parallel`` on an accelerated model (AdapterHub's ``Parallel(A, B, Fuse(A, B))``, which
AdapterHub refuses) enters a per-call route that the per-instance ``get_active_setup`` and
``compose`` hand to ``afkern/accelerate_routes.py``.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from .accelerate_routes import route_setup, routed_compose
from .accelerate_site import ATTR, Accelerated, Site, check, fuse, is_bottleneck, single
from .backends import backend_status, check_name
from .compiler import current_route

__all__ = ["accelerate", "is_accelerated"]


def is_accelerated(model: nn.Module) -> bool:
    """Whether :func:`accelerate` is on for ``model``."""
    return any(ATTR in m.__dict__ for m in model.modules())


def accelerate(model: nn.Module, backend: str = "auto", enable: bool = True) -> nn.Module:
    """Make a model prepared with AdapterHub's ``adapters`` (``adapters.init(model)`` or an
    ``AutoAdapterModel``) compute its ``Fuse`` setups and single adapters with afkern's layer, in
    place; returns the same object.

    Everything else of AdapterHub is unchanged (``set_active_adapters``, ``train_adapter_fusion``,
    ``AdapterTrainer``, ``save_adapter_fusion``, heads). Outputs and gradients equal AdapterHub's
    (float64 to 1e-9; float32 within twice AdapterHub's own float32 error).

    Args:
        model: the AdapterHub model.
        backend: an afkern backend name (``afkern.available_backends()``); ``auto`` picks per
            forward as afkern's blocks do.
        enable: False restores AdapterHub's own code (and drops afkern's caches).

    Raises:
        TypeError: ``model`` has no AdapterHub bottleneck layer (not prepared with ``adapters``).
        ValueError / RuntimeError: an unknown backend, or one that cannot run on the model's device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"afkern.accelerate expects a torch.nn.Module prepared with AdapterHub's adapters, "
                        f"got {type(model).__name__}")
    check_name(backend)
    try:
        layers = [m for m in model.modules() if is_bottleneck(m)]
    except ImportError as exc:  # pragma: no cover - adapters not installed
        raise TypeError(f"afkern.accelerate needs AdapterHub's adapters package ({exc})") from exc
    if not layers:
        raise TypeError(f"afkern.accelerate: {type(model).__name__} has no AdapterHub bottleneck layer; expected a "
                        "model prepared with adapters.init(model) or an adapters AutoAdapterModel")
    if not enable:
        for layer in layers:
            for attr in ("compose", "get_active_setup", ATTR):
                layer.__dict__.pop(attr, None)
        return model
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ok, why = backend_status(backend, device)
    if not ok:
        raise RuntimeError(f"afkern.accelerate: backend {backend!r} cannot run on {device}: {why}")
    record = Accelerated(backend)
    for layer in layers:  # nothing above wrote to the model: a refusal leaves it untouched
        layer.__dict__[ATTR] = Site(record)
        layer.__dict__["compose"] = types.MethodType(_compose, layer)
        layer.__dict__["get_active_setup"] = types.MethodType(_active_setup, layer)
    return model


# ---------------------------------------------------------------------------------------------
# the replacement of BottleneckLayer.compose
# ---------------------------------------------------------------------------------------------


def _active_setup(self):
    """``BottleneckLayer.get_active_setup``; under ``afkern.parallel`` (a per-call route covering
    this layer) the route itself, which :func:`_compose` runs (afkern/accelerate_routes.py)."""
    route = current_route(self)
    if route is None:
        return type(self).get_active_setup(self)
    return route_setup(self, route)


def _compose(self, adapter_setup, state):
    """``BottleneckLayer.compose`` with ``Fuse(a, b, ...)`` and ``Stack(a)`` on afkern's layer."""
    from adapters.composition import Fuse, Stack

    site: Site = self.__dict__[ATTR]
    if not isinstance(adapter_setup, (Fuse, Stack, str)) and current_route(self) is adapter_setup:
        return routed_compose(self, site, adapter_setup, state)
    names = list(adapter_setup) if isinstance(adapter_setup, (Fuse, Stack)) else None
    reason, activation = None, None
    if names is None or not all(isinstance(n, str) for n in names):
        reason = "a composition afkern does not fuse"
    elif isinstance(adapter_setup, Stack) and len(names) != 1:
        reason = "a stack of several adapters"
    elif any(n not in self.adapters for n in names):
        reason = f"not every adapter of it is at this layer ({self.location_key})"
    elif isinstance(adapter_setup, Fuse) and adapter_setup.name not in self.adapter_fusion_layer:
        reason = f"no fusion layer {adapter_setup.name!r} at {self.location_key}"
    else:
        reason, activation = check(self, names, isinstance(adapter_setup, Fuse), adapter_setup, state)
    if reason is not None:
        site.model.fall_back(adapter_setup, reason)
        return type(self).compose(self, adapter_setup, state)
    if isinstance(adapter_setup, Stack):
        return single(self, site, names[0], activation, state)
    return fuse(self, site, adapter_setup, names, activation, state)
