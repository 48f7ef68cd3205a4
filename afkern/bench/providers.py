"""Providers: the ways of computing a benchmark case, all from one :class:`~.models.Setup`.

Two kinds of case:

* ``block`` -- the fused site of layer 0 alone (BERT: the BertOutput replacement),
  ``fn(hidden_states [B, S, I], input_tensor [B, S, d]) -> [B, S, d]`` = dense + dropout + N
  Pfeiffer adapters + dynamic AdapterFusion + LayerNorm;
* ``model`` -- the whole base model, ``fn(inputs_embeds [B, S, d]) -> last_hidden_state [B, S, d]``,
  with the Fuse(N) at every layer.

Providers:

* ``adapters``: AdapterHub's patched site of ``am`` (block; called directly as
  ``module(hidden_states, input_tensor)``: outside a model forward there is no
  ``ForwardContext``, which ``adapters`` 1.3 does not need for a plain Fuse -- it then stores no
  fusion attentions; the correctness guard checks that the call computes the fused function), or
  the whole ``am`` (model);
* ``reference`` / ``torch`` / ``triton`` / ``cuda``: afkern's ``FusedAdapterBlock`` (or model)
  copied from ``fm`` (identical weights) with that backend;
* ``plain``: the plain site (BERT: dense + LayerNorm) or the plain model, the floor;
* ``plain_layer`` (block only): a whole plain layer (attention + feed-forward) at the same
  tokens, the unit in which the cost of one added adapter is expressed.

A :class:`Runner` carries the trainable fusion tensors whose gradients the correctness guard
checks, in one canonical order for every provider: per fused site, query weight, query bias, key
weight, key bias, value weight (none for the plain baselines, which compute another function).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..backends import REGISTRY
from .models import Setup

__all__ = [
    "AFKERN_BACKENDS", "BASELINES", "PROVIDERS", "Provider", "ProviderUnavailable", "Runner", "afkern_runner",
    "default_providers",
]

AFKERN_BACKENDS = tuple(REGISTRY)  # the registry's concrete backends, in its order
BASELINES = ("plain", "plain_layer")


class ProviderUnavailable(RuntimeError):
    """The provider cannot run here (missing package, wrong device, backend not built)."""


@dataclass
class Runner:
    """``fn(*inputs) -> Tensor`` and the trainable fusion tensors whose gradients are checked."""

    fn: Callable[..., torch.Tensor]
    fusion_params: List[torch.Tensor] = field(default_factory=list)


@dataclass
class Provider:
    """A way to compute the block / the model. ``build(setup, kind)`` returns a :class:`Runner` or
    raises :class:`ProviderUnavailable`. ``checked``: compared with the float64 oracle (the plain
    baselines compute another function and are not)."""

    name: str
    build: Callable[[Setup, str], Runner]
    checked: bool = True
    kinds: Tuple[str, ...] = ("block", "model")
    description: str = ""


def _model_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda e: model(inputs_embeds=e).last_hidden_state


def _afkern_fusion_params(root: nn.Module) -> List[torch.Tensor]:
    import afkern

    out = []
    for _, b in afkern.fused_blocks(root):
        out += [b.query.weight, b.query.bias, b.key.weight, b.key.bias, b.value.weight]
    return out


def _adapters_fusion_params(setup: Setup, layers: List[nn.Module]) -> List[torch.Tensor]:
    out = []
    for layer in layers:
        fl = setup.family.site(layer).adapter_fusion_layer[setup.fusion_name]
        out += [fl.query.weight, fl.query.bias, fl.key.weight, fl.key.bias, fl.value.weight]
    return out


def afkern_runner(setup: Setup, backend: str, kind: str, dtype: Optional[torch.dtype] = None) -> Runner:
    """A copy of afkern's block (layer 0's site) or model from ``setup.fm`` with ``backend``, cast
    to ``dtype`` if given (the correctness guard's float64 oracle is this with ``reference``)."""
    import afkern

    mod = copy.deepcopy(setup.fm if kind == "model" else setup.site(setup.fm))
    if dtype is not None:
        mod = mod.to(dtype)
    try:
        afkern.set_backend(mod, backend)
    except (RuntimeError, ValueError) as exc:
        raise ProviderUnavailable(str(exc)) from None
    fn = (lambda h, x: mod(h, x)) if kind == "block" else _model_fn(mod)
    return Runner(fn, _afkern_fusion_params(mod))


def _build_afkern(backend: str) -> Callable[[Setup, str], Runner]:
    def build(setup: Setup, kind: str) -> Runner:
        from afkern.backends import backend_status

        ok, why = backend_status(backend, setup.device)
        if not ok:
            raise ProviderUnavailable(why)
        return afkern_runner(setup, backend, kind)

    return build


def _build_adapters(setup: Setup, kind: str) -> Runner:
    if setup.am is None:
        raise ProviderUnavailable(setup.adapters_reason)
    layers = list(setup.family.layers(setup.am))
    if kind == "block":
        mod = setup.site(setup.am)
        return Runner(lambda h, x: mod(h, x), _adapters_fusion_params(setup, layers[:1]))
    return Runner(_model_fn(setup.am), _adapters_fusion_params(setup, layers))


def _build_plain(setup: Setup, kind: str) -> Runner:
    if kind == "block":
        mod = setup.site(setup.pm)
        return Runner(lambda h, x: mod(h, x))
    return Runner(_model_fn(setup.pm))


def _build_plain_layer(setup: Setup, kind: str) -> Runner:
    layer, call = setup.family.layers(setup.pm)[0], setup.family.call_layer
    return Runner(lambda h, x: call(layer, x))


PROVIDERS: Dict[str, Provider] = {
    "plain": Provider("plain", _build_plain, checked=False, description="no adapters (the plain site / model)"),
    "plain_layer": Provider("plain_layer", _build_plain_layer, checked=False, kinds=("block",),
                            description="a whole plain layer, the unit of the per-adapter cost"),
    "adapters": Provider("adapters", _build_adapters, description="AdapterHub adapters, Fuse(N)"),
    **{b: Provider(b, _build_afkern(b), description=f"afkern FusedAdapterBlock, backend {b!r}") for b in AFKERN_BACKENDS},
}


def default_providers(device: torch.device) -> List[str]:
    """Baselines, ``adapters`` and every afkern backend that can run on ``device`` (the Triton
    interpreter on CPU is a test tool, not a provider worth timing: named explicitly only)."""
    from afkern.backends import backend_status

    out = ["plain", "plain_layer", "adapters"]
    for b in AFKERN_BACKENDS:
        if b == "triton" and device.type != "cuda":
            continue
        if backend_status(b, device)[0]:
            out.append(b)
    return out
