"""AdapterHub's ``Fuse`` and single-adapter setups at one ``BottleneckLayer`` on afkern's layer: the
per-site computation behind ``afkern.accelerate`` (afkern/accelerate.py, whose docstring gives the
math and AdapterHub's per-call steps) and ``afkern.parallel`` on an accelerated model
(afkern/accelerate_routes.py). Reads AdapterHub's parameters at every call; the stacked adapter
tensors and folded fusion weights are cached per site on the version counters of their sources.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn

from .activations import canonical_activation
from .backends import REGISTRY, resolve_backend
from .ops.cache import Cache, version_key
from .ops.fold import FoldedWeights, fold_weights
from .ops.params import FusionParams, LayerSpec

__all__ = ["ATTR", "Accelerated", "Site", "is_bottleneck", "check", "layer_spec", "norm_params", "adapter_tensors",
           "sources_of", "folded_weights", "fusion_maps", "fusion_spec", "frozen", "single", "fuse"]


ATTR = "_afkern_accelerated"  # the per-instance record; its presence is what "accelerated" means


@dataclass
class Accelerated:
    """What one accelerated model shares between its layers: the backend name and the setups
    already warned about. Memo caches (stacks, folds) are per layer (:class:`Site`)."""

    backend: str
    warned: Set[str] = field(default_factory=set)

    def fall_back(self, setup, reason: str) -> None:
        msg = f"{setup!r} ({reason})"
        if msg not in self.warned:  # a benign race: two threads may both warn once
            self.warned.add(msg)
            warnings.warn(f"afkern.accelerate: the adapter setup {msg} is not computed by afkern; it runs on "
                          "AdapterHub's own code", RuntimeWarning, stacklevel=4)


@dataclass
class Site:
    """Memo caches of one BottleneckLayer (one slot per adapter set / fusion, keyed on the version
    counters of their sources: :class:`afkern.ops.cache.Cache`)."""

    model: Accelerated
    stacks: Cache = field(default_factory=Cache)
    folds: Cache = field(default_factory=Cache)


def is_bottleneck(module) -> bool:
    from adapters.methods.bottleneck import BottleneckLayer

    return isinstance(module, BottleneckLayer)


def check(layer, names: List[str], is_fuse: bool, setup, state) -> Tuple[Optional[str], Optional[str]]:
    """(why afkern's layer cannot compute this setup here or None, the adapters' activation)."""
    from adapters.configuration import BnConfig
    from adapters.methods.modeling import Adapter, BertFusion

    if state.input_tensor is None:
        return "no residual input at this site (a parallel-block model)", None
    if not isinstance(state.hidden_states, torch.Tensor) or state.hidden_states.shape != state.input_tensor.shape:
        return "hidden states and residual input of different shapes", None
    acts, sizes = set(), set()
    for n in names:
        a = layer.adapters[n]
        if type(a) is not Adapter:
            return f"adapter {n!r} is a {type(a).__name__}", None
        if a.add_layer_norm_before or a.add_layer_norm_after or a.use_gating or hasattr(a, "DropPath"):
            return f"adapter {n!r} has an adapter LayerNorm, gating or stochastic depth", None
        if not isinstance(a.scaling, float):
            return f"adapter {n!r} has a learned scaling", None
        down = a.adapter_down
        if len(down) != 2 or type(down[0]) is not nn.Linear or type(a.adapter_up) is not nn.Linear:
            return f"adapter {n!r} is not a plain linear bottleneck (PHM?)", None
        cfg = layer.adapters_config.match(n, config_type=BnConfig, layer_idx=layer.layer_idx,
                                          location_key=layer.location_key)
        try:
            acts.add(canonical_activation(cfg["non_linearity"] if cfg is not None else None))
        except (TypeError, ValueError, KeyError) as exc:
            return f"adapter {n!r}: {exc}", None
        sizes.add(down[0].out_features)
    if len(acts) > 1 or len(sizes) > 1:
        return "its adapters differ in activation or bottleneck size", None
    last = layer.adapters[names[-1]]
    if last.residual_before_ln == "post_add" and (state.layer_norm is None or not last.original_ln_before):
        return "residual_before_ln='post_add' without a layer norm", None
    if is_fuse:
        f = layer.adapter_fusion_layer[setup.name]
        if type(f) is not BertFusion:
            return f"its fusion layer is a {type(f).__name__}", None
        if not (f.config["query"] or f.config["key"] or f.config["value"]):
            return "a fusion without query, key and value", None
    return None, acts.pop()


def layer_spec(adapter, activation: str, state, d: int, n: int, r: int, **kw) -> LayerSpec:
    norm = state.layer_norm
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-12))) if norm is not None else 1e-12
    return LayerSpec(n_adapters=n, bottleneck=r, hidden=d, activation=activation,
                     original_ln_before=bool(adapter.original_ln_before), original_ln_after=False,
                     residual_before_ln=adapter.residual_before_ln, ln_eps=eps, layer_norm=norm is not None, **kw)


def norm_params(state) -> dict:
    norm = state.layer_norm
    if norm is None:
        return dict(ln_weight=None, ln_bias=None)
    if type(norm) is nn.LayerNorm and norm.weight is not None:
        return dict(ln_weight=norm.weight, ln_bias=norm.bias)
    return dict(ln_weight=getattr(norm, "weight", None), ln_bias=getattr(norm, "bias", None), norm_module=norm)


def sources_of(adapters) -> List[torch.Tensor]:
    return [t for a in adapters for t in (a.adapter_down[0].weight, a.adapter_down[0].bias, a.adapter_up.weight,
                                          a.adapter_up.bias)]


def _stack(adapters) -> Dict[str, torch.Tensor]:
    """afkern's stacked layout (``FusionParams``): up-projection transposed, float scaling folded in."""
    up_w = torch.stack([a.adapter_up.weight.t() * a.scaling if a.scaling != 1.0 else a.adapter_up.weight.t()
                        for a in adapters])
    up_b = torch.stack([a.adapter_up.bias * a.scaling if a.scaling != 1.0 else a.adapter_up.bias for a in adapters])
    return dict(down_weight=torch.stack([a.adapter_down[0].weight for a in adapters]),
                down_bias=torch.stack([a.adapter_down[0].bias for a in adapters]), up_weight=up_w, up_bias=up_b)


def adapter_tensors(site: Site, adapters, names: Tuple[str, ...]) -> Dict[str, torch.Tensor]:
    """The stacked adapter tensors: differentiable when they need gradients now, else cached on
    the version counters and storage of every source tensor (and the scalings)."""
    src = sources_of(adapters)
    if torch.is_grad_enabled() and any(t.requires_grad for t in src):
        return _stack(adapters)

    def build():
        with torch.no_grad():
            return _stack(adapters)

    return site.stacks.get(version_key(src) + tuple(a.scaling for a in adapters), build, slot=names)


def _layer_fn(site: Site, spec: LayerSpec, h2: torch.Tensor):
    return REGISTRY[resolve_backend(site.model.backend, h2.device, spec, h2.dtype)]


def single(layer, site: Site, name: str, activation: str, state):
    """``Stack(name)``: ``pre_block`` + ``compose_single`` (AdapterHub's ``Adapter.forward``)."""
    a = layer.adapters[name]
    h, x = state.hidden_states, state.input_tensor
    d = h.shape[-1]
    r = a.adapter_down[0].out_features
    s = a.scaling
    up_w, up_b = a.adapter_up.weight.t(), a.adapter_up.bias
    P = FusionParams(down_weight=a.adapter_down[0].weight.unsqueeze(0), down_bias=a.adapter_down[0].bias.unsqueeze(0),
                     up_weight=(up_w if s == 1.0 else up_w * s).unsqueeze(0),
                     up_bias=(up_b if s == 1.0 else up_b * s).unsqueeze(0), **norm_params(state))
    p = a.dropout.p if a.training else 0.0
    spec = layer_spec(a, activation, state, d, 1, r, fusion=False, active=0, adapter_dropout=float(p))
    h2, x2 = h.reshape(-1, d), x.reshape(-1, d)
    out, _ = _layer_fn(site, spec, h2).layer(h2, x2, P, spec, 1.0, None, None, None)
    return state._replace(hidden_states=out.reshape(h.shape), last=name)


def fusion_maps(fusion) -> Dict[str, Optional[torch.Tensor]]:
    """A ``BertFusion``'s query / key / value tensors as afkern's FusionParams fields (None where
    its config turns a map off)."""
    on = fusion.config
    g = lambda m, k: getattr(getattr(fusion, m), k) if on[m] else None  # noqa: E731
    return dict(query_weight=g("query", "weight"), query_bias=g("query", "bias"), key_weight=g("key", "weight"),
                key_bias=g("key", "bias"), value_weight=g("value", "weight"))


def fusion_spec(fusion, last, activation: str, state, d: int, n: int, r: int) -> LayerSpec:
    """The LayerSpec of ``fusion`` (a ``BertFusion``) over ``n`` adapters, ``last`` the last of them."""
    fc = fusion.config
    return layer_spec(last, activation, state, d, n, r, fusion=True, query=bool(fc["query"]), key=bool(fc["key"]),
                      value=bool(fc["value"]), query_before_ln=bool(fc["query_before_ln"]),
                      residual_before=bool(fc["residual_before"]), score_dropout=float(fusion.dropout.p))


def frozen(fusion, sources) -> bool:
    """Whether a fusion's folded inference weights may serve this call: its sources need no
    gradient now and are not being trained."""
    return not (any(t.requires_grad for t in sources) and (torch.is_grad_enabled() or fusion.training))


def fuse(layer, site: Site, setup, names: List[str], activation: str, state):
    """``compose_fuse`` of a Fuse of plain adapters: the whole fusion in afkern's layer."""
    from adapters.context import ForwardContext

    fusion = layer.adapter_fusion_layer[setup.name]
    ads = [layer.adapters[n] for n in names]
    h, x = state.hidden_states, state.input_tensor
    d = h.shape[-1]
    N, r = len(ads), ads[0].adapter_down[0].out_features
    h2, x2 = h.reshape(-1, d), x.reshape(-1, d)
    # AdapterHub's per-call random draws, in its order: each child's adapter dropout (its result
    # is not used by the fusion), then the score dropout on the [B, S, N] scores
    for a in ads:
        if a.training and a.dropout.p > 0:
            a.dropout(torch.empty_like(h))
    score_scale = None
    if fusion.training and fusion.dropout.p > 0:
        score_scale = fusion.dropout(torch.ones(*h.shape[:-1], N, dtype=h.dtype, device=h.device)).reshape(-1, N)
    T = fusion.T
    fusion.T = max(T - fusion.reduction, 1.0)  # AdapterHub anneals after every call, train and eval
    fparams = fusion_maps(fusion)
    spec = fusion_spec(fusion, ads[-1], activation, state, d, N, r)
    P = FusionParams(**adapter_tensors(site, ads, tuple(names)), **fparams, **norm_params(state))
    backend = _layer_fn(site, spec, h2)
    folded = None
    if backend.folds and score_scale is None and not torch.compiler.is_compiling():
        sources = sources_of(ads) + list(fusion.parameters())
        if frozen(fusion, sources):
            folded = folded_weights(site, setup.name, sources, ads, P, spec)
    out, probs = backend.layer(h2, x2, P, spec, 1.0 / T, score_scale, folded, None)
    context = ForwardContext.get_context()
    if context is not None and getattr(context, "output_adapter_fusion_attentions", False):
        layer._store_fusion_attentions(setup.name, probs.detach().reshape(*h.shape[:-1], N).cpu().numpy())
    return state._replace(hidden_states=out.reshape(h.shape), last=names[-1])


def folded_weights(site: Site, name, sources, ads, P: FusionParams, spec: LayerSpec) -> FoldedWeights:
    key = (version_key(sources), tuple(a.scaling for a in ads), spec)
    return site.folds.get(key, lambda: fold_weights(P, spec), slot=name)
