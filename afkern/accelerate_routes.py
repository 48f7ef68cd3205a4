"""``afkern.parallel`` on an accelerated AdapterHub model (docs/DESIGN.md section 7).

``afkern.parallel(model, ["a", "b", "a,b"])`` on a model after ``afkern.accelerate(model)`` is
AdapterHub's ``Parallel(a, b, Fuse(a, b))``, which AdapterHub refuses: the same mechanism as on a
patched model (``afkern/parallel.py``: batch tiled at the first layer holding an adapter site, a
per-call route in ``compiler.ACTIVE_ROUTES``). The route's entries are AdapterHub setups, one per
row: a fusion by its AdapterHub name (``Fuse(a, b).name``, the comma-joined adapters), an adapter by
its name; it covers the model's ``BottleneckLayer``\\ s. At each of them:

* ``get_active_setup`` (accelerate's, per instance) returns the route where this layer holds the
  adapters of every setup (:func:`route_setup`; None where it holds none of them, AdapterHub's own
  rule for a layer without the active adapters), so AdapterHub's ``bottleneck_layer_forward`` runs
  as ever and hands the route to accelerate's ``compose``;
* :func:`routed_compose` runs the rows of each kind in ONE afkern layer call over a segment plan
  (``afkern.ops.segments``): the union of the setups' adapters stacked [N, r, d], one
  :class:`Segment` per setup (a fusion: its own adapters by index, query / key / value,
  temperature, score dropout; an adapter: its index), the rows sorted by setup once per call.
  AdapterHub's ``post_forward`` of the setup's last adapter then does the last add + norm of every
  row, so the setups of one call must agree on it (and on the layer's prologue): a clear error
  otherwise.

Nothing here writes to the model or AdapterHub's active setup: the route is the call's own.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .accelerate_site import (ATTR, adapter_tensors, check, folded_weights, frozen, fusion_maps, fusion_spec,
                              layer_spec, norm_params, sources_of)
from .backends import REGISTRY, resolve_routed
from .compiler import by_kind
from .ops.params import FusionParams
from .ops.segments import RoutedFold, Segment, SegmentPlan, route_plan

__all__ = ["resolve_setups", "route_setup", "routed_compose"]


def _layers(model: nn.Module) -> list:
    return [m for m in model.modules() if ATTR in m.__dict__]


def resolve_setups(model: nn.Module, setups: Sequence) -> Tuple[List[str], List[str], frozenset]:
    """(names, kinds, layer ids) of ``parallel``'s setups on an accelerated AdapterHub model: an
    adapter name, a fusion name (AdapterHub's: ``"a,b"``) or a ``Fuse(...)`` / ``Stack(name)``
    object. ValueError / TypeError naming what was expected; nothing is written."""
    from adapters.composition import Fuse, Stack

    cfg = model.adapters_config
    adapters, fusions = list(cfg.adapters), list(cfg.fusions)
    names, kinds = [], []
    for s in setups:
        if isinstance(s, Fuse):
            s = s.name
        elif isinstance(s, Stack) and len(s) == 1 and isinstance(s[0], str):
            s = s[0]
        if not isinstance(s, str):
            raise TypeError(f"afkern.parallel setups of an AdapterHub model are adapter names, fusion names "
                            f"(\"a,b\") or Fuse(...) objects, got {s!r}")
        is_f, is_a = s in fusions, s in adapters
        if is_f and is_a:
            raise ValueError(f"{s!r} names both a fusion and an adapter of the model; rename one")
        if not (is_f or is_a):
            raise ValueError(f"unknown setup {s!r}: the model has adapters {adapters} and fusions {fusions}")
        names.append(s)
        kinds.append("fusion" if is_f else "adapter")
    return names, kinds, frozenset(id(m) for m in _layers(model))


def _members(layer, kind: str, name: str) -> List[str]:
    return list(layer.adapters_config.get_fusion(name)[1]) if kind == "fusion" else [name]


def _distinct(route) -> List[Tuple[str, str]]:
    kinds = route.kinds or [route.kind] * len(route.names)
    return list(dict.fromkeys(zip(kinds, route.names)))


def route_setup(layer, route):
    """What accelerate's ``get_active_setup`` gives at ``layer`` under ``route``: the route where
    the layer holds adapters of every setup, None where of none (or AdapterHub skips the layer)."""
    skip = layer.adapters_config.skip_layers
    if skip is not None and layer.layer_idx in skip:
        return None
    here = set(layer.adapter_modules.keys())
    present = [bool(here & set(_members(layer, k, n))) for k, n in _distinct(route)]
    if not any(present):
        return None
    if not all(present):
        missing = [n for (_, n), p in zip(_distinct(route), present) if not p]
        raise ValueError(f"afkern.parallel: the setups {missing} have no adapter at {layer.location_key} of layer "
                         f"{layer.layer_idx} while the others do; run them in separate calls")
    return route


def _fusion_segment(layer, name: str, index: torch.Tensor, spec, rows: int, dtype, params) -> Segment:
    """One Fuse's segment: its adapters (``index`` into the call's stack), its maps, AdapterHub's
    per-call steps (the temperature anneals after every call; the score dropout of its rows in
    training). ``params``: its FusionParams, for the reference backend (else None)."""
    fusion = layer.adapter_fusion_layer[name]
    score_scale = None
    if fusion.training and fusion.dropout.p > 0:
        score_scale = fusion.dropout(torch.ones(rows, len(index), dtype=dtype, device=index.device))
    T = fusion.T
    fusion.T = max(T - fusion.reduction, 1.0)
    maps = fusion_maps(fusion)
    return Segment(index=index, spec=spec, **maps, inv_temperature=1.0 / T, score_scale=score_scale,
                   params=None if params is None else params.replace(**maps))


def _kind_call(layer, site, kind: str, setups: List[str], row_names: List[str], h, x, state, activation: str):
    """The rows ``h`` / ``x`` [n, (S,) d] of one kind, row i through ``row_names[i]``, in one
    segmented layer call."""
    d = h.shape[-1]
    present = [n for n in setups if n in row_names]
    members = {n: _members(layer, kind, n) for n in present}
    union = list(dict.fromkeys(a for n in present for a in members[n]))
    ads = [layer.adapters[a] for a in union]
    r = ads[0].adapter_down[0].out_features
    last = layer.adapters[members[present[0]][-1]]
    seq = h.shape[1] if h.dim() == 3 else 1
    rows = route_plan([present.index(n) for n in row_names], present, seq, h.device)
    P = FusionParams(**adapter_tensors(site, ads, tuple(union)), **norm_params(state))
    if kind == "adapter":
        p = last.dropout.p if last.training else 0.0
        spec = layer_spec(last, activation, state, d, len(union), r, fusion=False, active=0, adapter_dropout=float(p))
        segs = [Segment(index=None, spec=dataclasses.replace(spec, active=union.index(n)), query_weight=None,
                        query_bias=None, key_weight=None, key_bias=None, value_weight=None) for n in present]
        backend = REGISTRY[resolve_routed(site.model.backend, h.device, None, h.dtype)]
    else:
        fspecs = [fusion_spec(layer.adapter_fusion_layer[n], last, activation, state, d, len(members[n]), r)
                  for n in present]
        spec = dataclasses.replace(fspecs[0], n_adapters=len(union), query_before_ln=False, residual_before=False,
                                   score_dropout=0.0)
        backend = REGISTRY[resolve_routed(site.model.backend, h.device, spec, h.dtype)]
        for n in present:  # AdapterHub draws each child's adapter dropout (the fusion discards it)
            for a in members[n]:
                if layer.adapters[a].training and layer.adapters[a].dropout.p > 0:
                    layer.adapters[a].dropout(torch.empty_like(h))
        segs = []
        for k, n in enumerate(present):
            index = torch.tensor([union.index(a) for a in members[n]], device=h.device)
            s, e = rows.bounds[k]
            own = P.select(index) if backend.name == "reference" else None
            segs.append(_fusion_segment(layer, n, index, fspecs[k], e - s, h.dtype, own))
        if backend.folds and not torch.compiler.is_compiling() and all(g.score_scale is None for g in segs):
            folds = [_routed_fold(layer, site, n, union, ads, P, fspecs[k]) for k, n in enumerate(present)]
            if all(f is not None for f in folds):
                segs = [dataclasses.replace(g, folded=f) for g, f in zip(segs, folds)]
    out, _ = backend.layer(h.reshape(-1, d), x.reshape(-1, d), P, spec, 1.0, None, None, None,
                           SegmentPlan(rows, segs))
    return out.reshape(h.shape)


def _routed_fold(layer, site, name: str, union: List[str], ads, P: FusionParams, fspec):
    """Fusion ``name``'s folded inference maps over every adapter of the call (``union``, the
    row op masks the others out), as a routed block folds its fusions (``compiler.routed_folds``);
    None while its weights need gradients (then the layer runs unfolded). Cached per site."""
    fusion = layer.adapter_fusion_layer[name]
    sources = sources_of(ads) + list(fusion.parameters())
    if not frozen(fusion, sources):
        return None
    Pn = P.replace(**fusion_maps(fusion))
    spec = dataclasses.replace(fspec, n_adapters=len(union))
    fw = folded_weights(site, ("route", tuple(union), name), sources, ads, Pn, spec)
    NR = len(union) * P.down_weight.shape[1]
    if fw.w_q is None:  # w_in = [Wd^T | w_q]: the query part follows the shared Z part
        return RoutedFold(fw.w_in[:, NR:], fw.b_in[NR:], fw.w_out, fw.w_res)
    return RoutedFold(fw.w_q, fw.b_q, fw.w_out, fw.w_res)


def _agree(layer, setups: List[Tuple[str, str]], state) -> str:
    """The common activation of the setups at ``layer``, or ValueError: each must be one afkern's
    layer computes (accelerate's checks) and all must share the site's prologue and epilogue."""
    acts, sites = set(), set()
    for kind, n in setups:
        members = _members(layer, kind, n)
        setup = _setup_object(kind, n, members)
        reason, act = check(layer, members, kind == "fusion", setup, state)
        if reason is None and kind == "fusion" and n not in layer.adapter_fusion_layer:
            reason = f"no fusion layer {n!r} here"
        if reason is None and any(a not in layer.adapters for a in members):
            reason = "not every adapter of it is at this layer"
        if reason is not None:
            raise ValueError(f"afkern.parallel: setup {n!r} at {layer.location_key} of layer {layer.layer_idx} "
                             f"cannot run on afkern's layer: {reason}")
        last = layer.adapters[members[-1]]
        acts.add(act)
        sites.add((last.original_ln_before, last.original_ln_after, last.residual_before_ln,
                   layer.adapters[members[0]].adapter_down[0].out_features))
    if len(acts) > 1 or len(sites) > 1:
        raise ValueError(f"afkern.parallel: the setups {[n for _, n in setups]} differ at {layer.location_key} of "
                         f"layer {layer.layer_idx} in activation, bottleneck size or where the residual and layer "
                         "norm go; one call runs setups that share them: run the others in separate calls")
    return acts.pop()


def _setup_object(kind: str, name: str, members: List[str]):
    from adapters.composition import Fuse, Stack

    return Fuse(*members, name=name) if kind == "fusion" else Stack(name)


def routed_compose(layer, site, route, state):
    """accelerate's ``compose`` under ``route``: every row through its own setup, the rows of each
    kind in one segmented afkern layer call; returns AdapterHub's state (``last``: the first
    setup's last adapter, whose ``post_forward`` all setups share)."""
    h, x = state.hidden_states, state.input_tensor
    if x is None or not isinstance(h, torch.Tensor) or h.shape != x.shape or h.dim() not in (2, 3):
        raise ValueError(f"afkern.parallel: the adapter site {layer.location_key} has no residual input of the "
                         "hidden states' shape (a parallel-block model); it cannot run there")
    n = h.shape[0]
    if n != len(route.names):
        raise ValueError(f"afkern.parallel: the route has {len(route.names)} rows but the adapter site "
                         f"{layer.location_key} sees {n}; was the batch changed inside the model?")
    setups = _distinct(route)
    activation = _agree(layer, setups, state)
    kinds = route.kinds or [route.kind] * n

    def run(kind, rows, h_k, x_k):
        names = [route.names[i] for i in rows]
        return _kind_call(layer, site, kind, [s for k, s in setups if k == kind], names, h_k, x_k, state, activation)

    out = by_kind(h, x, kinds, run)
    first_kind, first = setups[0]
    return state._replace(hidden_states=out, last=_members(layer, first_kind, first)[-1])
