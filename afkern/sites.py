"""Adapter sites: where a family runs AdapterHub's adapters, and how a fused block gets there.

AdapterHub runs every architecture through one routine, ``bottleneck_layer_forward(h,
residual_input, layer_norm)``; a model family only decides *where* it is called and with which
``h``, ``residual_input`` and norm (docs/FAMILIES.md). afkern's :class:`FusedAdapterBlock` computes
that routine (``adapter_forward(h, residual_input)`` with the site's norm attached), so placing it
in any family is a matter of data: one :class:`Family` entry in the site table
(``afkern/families.py``) whose :class:`Site` rows say, per layer, one of two things:

* **swap** (``Site.swap``): the site is a module ``forward(hidden_states, input_tensor)`` computing
  ``norm(dropout(dense(hidden_states)) + input_tensor)`` (BERT's ``BertOutput`` /
  ``BertSelfOutput``, DeBERTa's): the block takes its place (``FusedAdapterBlock.from_output_module``,
  sharing its dense, dropout and norm).
* **hook** (``Site.h``, ``Site.r``, ``Site.to``): the layer computes the sub-layer output itself
  and adds the residual inline. Taps read AdapterHub's ``h`` and ``residual_input`` from module
  outputs or inputs (forward hooks and pre-hooks), and the site output replaces what the layer
  goes on with (a module's output, or an input of the next module). The block is registered in the
  layer as ``<layer>.afkern_<mh|cross|output>``; the base model's own ``state_dict`` keys do not
  change.

Tap notation: ``"<module path relative to the layer>:<how>"``; the empty path is the layer itself;
``how`` is ``out`` (the module's output; element 0 of a tuple), ``out@K`` (its output at its K-th
call within one layer call: a module the layer calls twice), ``arg0`` / ``arg1`` (its first /
second input, positional or by keyword).

Hooks are callable objects holding their :class:`LayerHooks` (no closures), so they survive
``copy.deepcopy`` (the copy's hooks point at the copy's blocks), pickling, ``model.to()`` and
``load_state_dict``, and ``torch.compile`` traces them. Per-layer-call state (the tapped tensors,
call counters) is per thread (``LayerHooks.state``, a ``threading.local``, as AdapterHub keeps its
forward context per thread), so several threads can call one model at once; it is reset by a
pre-hook on the layer, so layers that run several times per forward (ALBERT's shared layer,
gradient-checkpoint recomputation) work, and cleared when the layer returns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import FusedAdapterBlock

__all__ = ["Site", "Stack", "Family", "Slot", "LayerHooks", "LOCATIONS", "base_model_of", "slots_of",
           "site_blocks", "install_sites", "remove_sites", "layer_hooks"]

#: AdapterHub's location keys (config flags ``mh_adapter``, ``cross_adapter``, ``output_adapter``).
LOCATIONS = ("mh_adapter", "cross_adapter", "output_adapter")
_SHORT = {"mh_adapter": "mh", "cross_adapter": "cross", "output_adapter": "output"}
_HOWS = ("out", "arg0", "arg1")


# ------------------------------------------------------------------------------------ the table types
@dataclass(frozen=True)
class Site:
    """One place where AdapterHub calls ``bottleneck_layer_forward`` in every layer of a stack.

    location: AdapterHub's location key (``"mh_adapter"``, ``"cross_adapter"``, ``"output_adapter"``).
    ah:       AdapterHub's module holding the site's ``adapters`` / ``adapter_fusion_layer``, relative
              to the layer, in transformers-4 names (its saved keys: ``<layer>.<ah>.adapters.<name>...``).
    swap:     swap kind: the output module (relative to the layer) the block replaces.
    h, r:     hook kind: taps of AdapterHub's ``hidden_states`` and ``residual_input``.
    to:       hook kind: taps whose value becomes the site output (a module's ``out`` or an ``arg``).
    norm:     the norm module (relative to the layer) handed to the adapters; None: norm-free site.
    """

    location: str
    ah: str
    swap: Optional[str] = None
    h: Optional[str] = None
    r: Optional[str] = None
    to: Tuple[str, ...] = ()
    norm: Optional[str] = None

    def __post_init__(self):
        if self.location not in LOCATIONS:
            raise ValueError(f"site location must be one of {LOCATIONS}, got {self.location!r}")
        if (self.swap is None) == (self.h is None):
            raise ValueError(f"site {self.ah!r}: give either swap or the taps h, r, to")
        if self.swap is None:
            if self.r is None or not self.to:
                raise ValueError(f"site {self.ah!r}: a hook site needs h, r and to")
            for t in (self.h, self.r) + tuple(self.to):
                parse_tap(t)

    @property
    def kind(self) -> str:
        return "swap" if self.swap is not None else "hook"

    @property
    def attr(self) -> str:
        """Where the block lives, relative to the layer."""
        return self.swap if self.swap is not None else f"afkern_{_SHORT[self.location]}"


@dataclass(frozen=True)
class Stack:
    """One list of layers and the sites of each.

    layers:          path of the layers in the base model, ``*`` = every item of a ModuleList
                     (``"h.*"``, ``"encoder.albert_layer_groups.*.albert_layers.*"``).
    ah_layers:       the same path in AdapterHub's (transformers-4) names when they differ
                     (ViT on transformers 5: ``"layers.*"`` here, ``"encoder.layer.*"`` in keys).
    inline_residual: the layer adds residuals inline (pre-LN families): once a site of a layer has
                     a block, every later site of that layer is hooked too (without a block it
                     computes AdapterHub's no-adapter output ``h + residual_input``), so the
                     replaced value reaches the layer's output.
    """

    layers: str
    sites: Tuple[Site, ...]
    ah_layers: Optional[str] = None
    inline_residual: bool = False

    def __post_init__(self):
        if self.ah_layers is not None and self.ah_layers.count("*") != self.layers.count("*"):
            raise ValueError(f"stack {self.layers!r}: ah_layers {self.ah_layers!r} needs as many '*'")
        if self.inline_residual and any(s.norm is not None or s.swap for s in self.sites):
            raise ValueError(f"stack {self.layers!r}: inline-residual stacks have norm-free hook sites only")


@dataclass(frozen=True)
class Family:
    """One entry of the site table (``afkern/families.py``).

    model_types:        ``config.model_type`` values of this family.
    stacks:             its layer stacks on transformers 4.x; ``stacks_v5`` on 5.x where they differ.
    score_dropout:      config attribute AdapterHub reads for the fusion's default score dropout
                        (its ``attention_probs_dropout_prob`` mapping); None: 0.
    functional_dropout: ``(layer attribute, module paths)``: the layer applies
                        ``F.dropout(p=layer.<attribute>)`` to those modules' outputs (BART), where
                        no hook can see it; afkern moves that dropout into a forward hook on the
                        module (same call, same RNG order) and sets the attribute to 0, so the
                        taps see exactly the dropped output AdapterHub's adapters get.
    requires:           ``(config attribute, value)`` pairs the site table assumes.
    """

    name: str
    model_types: Tuple[str, ...]
    stacks: Tuple[Stack, ...]
    stacks_v5: Optional[Tuple[Stack, ...]] = None
    score_dropout: Optional[str] = "attention_probs_dropout_prob"
    functional_dropout: Optional[Tuple[str, Tuple[str, ...]]] = None
    requires: Tuple[Tuple[str, Any], ...] = ()
    title: str = ""

    def stacks_for(self, major: Optional[int] = None) -> Tuple[Stack, ...]:
        major = _tf_major() if major is None else major
        return self.stacks_v5 if (major >= 5 and self.stacks_v5 is not None) else self.stacks

    def locations(self, major: Optional[int] = None) -> Tuple[str, ...]:
        have = {s.location for st in self.stacks_for(major) for s in st.sites}
        return tuple(loc for loc in LOCATIONS if loc in have)

    @property
    def kind(self) -> str:
        return "swap" if all(s.swap for st in self.stacks for s in st.sites) else "hook"


def _tf_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def parse_tap(tap: str) -> Tuple[str, str, Optional[int]]:
    """``"attn:out@1"`` -> ``("attn", "out", 1)``."""
    path, sep, how = tap.rpartition(":")
    if not sep:
        raise ValueError(f"tap {tap!r} must be '<path>:<how>'")
    call = None
    if "@" in how:
        how, _, k = how.partition("@")
        call = int(k)
    if how not in _HOWS or (call is not None and how != "out"):
        raise ValueError(f"tap {tap!r}: how must be one of out, out@K, arg0, arg1")
    return path, how, call


# ------------------------------------------------------------------------------------ slots
@dataclass(eq=False)
class Slot:
    """One site of one layer of a model: where a block goes, and its AdapterHub key prefix."""

    family: Family
    stack: Stack
    site: Site
    layer: nn.Module
    path: str          # the layer's path in the base model ("h.0")
    ah_path: str       # AdapterHub's path of that layer ("h.0"; ViT-5 "layers.0" -> "encoder.layer.0")
    index: int         # AdapterHub's layer_idx (decoder layers numbered after the encoder's)

    @property
    def ah_prefix(self) -> str:
        """AdapterHub's key prefix of the site (relative to the base model)."""
        return f"{self.ah_path}.{self.site.ah}"

    @property
    def where(self) -> str:
        return f"{self.path} {self.site.location}"

    def block(self) -> Optional[FusedAdapterBlock]:
        """The fused block at this site, if any."""
        m = _get(self.layer, self.site.attr)
        return m if isinstance(m, FusedAdapterBlock) else None


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers base model (``model.base_model``; the model itself when bare)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _get(root: nn.Module, path: str):
    for part in filter(None, path.split(".")):
        if part.isdigit() and isinstance(root, (nn.ModuleList, nn.Sequential)):
            i = int(part)
            if i >= len(root):
                return None
            root = root[i]
        else:
            root = getattr(root, part, None)
        if root is None:
            return None
    return root


def _expand(root: nn.Module, pattern: str) -> Optional[List[Tuple[str, Tuple[int, ...], nn.Module]]]:
    """Every (path, wildcard indices, module) matching ``pattern``; None if a segment is missing."""
    found: List[Tuple[str, Tuple[int, ...], nn.Module]] = [("", (), root)]
    for part in pattern.split("."):
        nxt = []
        for path, idx, mod in found:
            if part == "*":
                if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
                    return None
                nxt += [(f"{path}.{k}".lstrip("."), idx + (k,), child) for k, child in enumerate(mod)]
            else:
                child = getattr(mod, part, None)
                if not isinstance(child, nn.Module):
                    return None
                nxt.append((f"{path}.{part}".lstrip("."), idx, child))
        found = nxt
    return found


def _fill(pattern: str, idx: Tuple[int, ...]) -> str:
    parts, it = [], iter(idx)
    for p in pattern.split("."):
        parts.append(str(next(it)) if p == "*" else p)
    return ".".join(parts)


def slots_of(model: nn.Module, family: Family, major: Optional[int] = None) -> List[Slot]:
    """Every site of every layer of ``model`` (a base model or a model with a head), in forward
    order (encoder before decoder; per layer in the table's order). Stacks the model lacks (T5's
    decoder in a T5EncoderModel) are skipped."""
    base = base_model_of(model)
    out: List[Slot] = []
    index = 0
    for stack in family.stacks_for(major):
        layers = _expand(base, stack.layers)
        if layers is None:
            continue
        for path, idx, layer in layers:
            ah_path = _fill(stack.ah_layers, idx) if stack.ah_layers else path
            out += [Slot(family, stack, site, layer, path, ah_path, index) for site in stack.sites]
            index += 1
    return out


def site_blocks(model: nn.Module, family: Family) -> List[Tuple[Slot, FusedAdapterBlock]]:
    """(slot, block) for every site of ``model`` that holds a fused block."""
    return [(s, b) for s in slots_of(model, family) for b in [s.block()] if b is not None]


# ------------------------------------------------------------------------------------ hooks
_HIDDEN_KW = ("hidden_states", "hidden_state", "x", "input", "query")


def _arg(args, kwargs, how: str):
    if how == "arg0":
        if args:
            return args[0]
        for k in _HIDDEN_KW:
            if k in kwargs:
                return kwargs[k]
    elif len(args) > 1:
        return args[1]
    elif "input_tensor" in kwargs:
        return kwargs["input_tensor"]
    return None


def _set_arg(args, kwargs, how: str, value):
    if how == "arg0":
        if args:
            return (value,) + tuple(args[1:]), kwargs
        key = next(k for k in _HIDDEN_KW if k in kwargs)
    elif len(args) > 1:
        return (args[0], value) + tuple(args[2:]), kwargs
    else:
        key = "input_tensor"
    kwargs = dict(kwargs)
    kwargs[key] = value
    return args, kwargs


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_first(out, value):
    if isinstance(out, tuple):
        return (value,) + out[1:]
    if isinstance(out, list):
        return [value] + out[1:]
    return value


class _PreHook:
    """Forward pre-hook of one module of a layer: replacements of inputs, then input taps."""

    def __init__(self, owner: "LayerHooks", path: str, layer_level: bool):
        self.owner, self.path, self.layer_level = owner, path, layer_level

    def __call__(self, module, args, kwargs):
        o = self.owner
        if self.layer_level:
            o.state.clear()
        changed = False
        for act in o.actions[self.path]["pre"]:
            if act[0] == "put":
                _, how, k = act
                args, kwargs = _set_arg(args, kwargs, how, o.value(k))
                changed = True
            else:  # ("tap", how, slot)
                _, how, slot = act
                v = _arg(args, kwargs, how)
                if v is None:
                    o.missing(slot, f"{self.path or 'the layer'}'s {how}")
                o.state[slot] = v
        return (args, kwargs) if changed else None


class _PostHook:
    """Forward hook of one module of a layer: moved dropout, output taps, then output replacements."""

    def __init__(self, owner: "LayerHooks", path: str, layer_level: bool):
        self.owner, self.path, self.layer_level = owner, path, layer_level

    def __call__(self, module, args, out):
        o = self.owner
        acts = o.actions[self.path]["post"]
        n = None
        if o.counted.get(self.path):  # the module runs several times per layer call: count the calls
            counter = ("calls", self.path)
            n = o.state.get(counter, 0)
            o.state[counter] = n + 1
        new = None
        for act in acts:
            cur = out if new is None else new
            if act[0] == "drop":
                new = _with_first(cur, F.dropout(_first(cur), o.dropout_rate, o.layer.training))
            elif act[0] == "tap":
                _, call, slot = act
                if call is None or call == n:
                    o.state[slot] = _first(cur)
            else:  # ("put", k)
                new = _with_first(cur, o.value(act[1]))
        if self.layer_level:
            o.state.clear()
        return new


class LayerHooks:
    """The hooks of one layer: for each hooked site its taps and replacements, per-call state.

    ``sites``: the hooked sites in layer order; one whose block is absent (an inline-residual
    stack's later site) computes AdapterHub's no-adapter output ``h + residual_input``. The block
    is looked up by name at every call (``layer.afkern_<site>``), so replacing it
    (``afkern.drop_adapters``) needs no re-hooking. Held by the layer as ``layer._afkern_hooks``;
    :meth:`detach` removes every hook and restores what it changed.
    """

    def __init__(self, layer: nn.Module, family: Family, sites: Sequence[Site], where: str):
        self.layer = layer
        self.family = family.name
        self.where = where
        self.sites: Tuple[Site, ...] = tuple(sites)
        self._local = threading.local()
        self.dropout_attr: Optional[str] = None
        self.dropout_rate = 0.0
        self._handles: List[Any] = []
        self.actions: Dict[str, Dict[str, list]] = {}
        self.counted: Dict[str, bool] = {}
        self._plan(family)

    @property
    def state(self) -> Dict[Any, Any]:
        """This thread's state of the current layer call (taps, call counters, site outputs): a
        concurrent call of the same layer in another thread has its own."""
        st = getattr(self._local, "state", None)
        if st is None:
            st = self._local.state = {}
        return st

    def __getstate__(self):  # deepcopy / pickle: the per-thread state does not travel
        d = dict(self.__dict__)
        d.pop("_local", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._local = threading.local()

    # the plan: per module path, pre-hook and post-hook actions in the order they must run
    def _plan(self, family: Family) -> None:
        acts: Dict[str, Dict[str, list]] = {"": {"pre": [], "post": []}}

        def at(path):
            return acts.setdefault(path, {"pre": [], "post": []})

        if family.functional_dropout is not None:
            attr, paths = family.functional_dropout
            self.dropout_attr = attr
            for p in paths:
                if _get(self.layer, p) is not None:
                    at(p)["post"].append(("drop",))
        puts_pre, taps_pre, taps_post, puts_post = [], [], [], []
        for k, site in enumerate(self.sites):
            for tap in site.to:
                path, how, _ = parse_tap(tap)
                (puts_post if how == "out" else puts_pre).append((path, ("put", k) if how == "out" else ("put", how, k)))
            for which, tap in (("h", site.h), ("r", site.r)):
                path, how, call = parse_tap(tap)
                slot = (which, k)
                if how == "out":
                    taps_post.append((path, ("tap", call, slot)))
                    if call is not None:
                        self.counted[path] = True
                else:
                    taps_pre.append((path, ("tap", how, slot)))
        for group, phase in ((puts_pre, "pre"), (taps_pre, "pre"), (taps_post, "post"), (puts_post, "post")):
            for path, act in group:
                at(path)[phase].append(act)
        self.actions = acts

    def check(self) -> None:
        """Every module the plan names exists in the layer (else a TypeError naming it)."""
        for site in self.sites:
            paths = [parse_tap(t)[0] for t in (site.h, site.r) + tuple(site.to)] + ([site.norm] if site.norm else [])
            for p in paths:
                if p and _get(self.layer, p) is None:
                    raise TypeError(
                        f"{type(self.layer).__name__} at {self.where} has no submodule {p!r}, which afkern's "
                        f"{self.family} site table expects for the {site.location} site (transformers "
                        f"{_tf_version()}); the model's layer code differs from the families afkern knows"
                    )
        if self.dropout_attr is not None and not isinstance(getattr(self.layer, self.dropout_attr, None), (int, float)):
            raise TypeError(f"{type(self.layer).__name__} at {self.where} has no float attribute "
                            f"{self.dropout_attr!r} (its functional dropout rate), which the {self.family} entry expects")

    def attach(self) -> "LayerHooks":
        self.check()
        for path in self.actions:
            mod = self.layer if path == "" else _get(self.layer, path)
            acts = self.actions[path]
            if acts["pre"] or path == "":
                self._handles.append(mod.register_forward_pre_hook(_PreHook(self, path, path == ""), with_kwargs=True))
            if acts["post"] or path == "":
                self._handles.append(mod.register_forward_hook(_PostHook(self, path, path == "")))
        if self.dropout_attr is not None:
            self.dropout_rate = float(getattr(self.layer, self.dropout_attr))
            setattr(self.layer, self.dropout_attr, 0.0)
        self.layer.__dict__["_afkern_hooks"] = self
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.dropout_attr is not None:
            setattr(self.layer, self.dropout_attr, self.dropout_rate)
        self.layer.__dict__.pop("_afkern_hooks", None)
        self.state.clear()

    def value(self, k: int) -> torch.Tensor:
        """The output of site ``k`` in this layer call (computed once)."""
        key = ("value", k)
        v = self.state.get(key)
        if v is None:
            h, r = self.state.get(("h", k)), self.state.get(("r", k))
            if h is None:
                self.missing(("h", k), self.sites[k].h)
            if r is None:
                self.missing(("r", k), self.sites[k].r)
            site = self.sites[k]
            block = self.layer._modules.get(site.attr)
            if isinstance(block, FusedAdapterBlock):
                v = block.adapter_forward(h, r)
            elif site.norm is not None:  # no block (removed): AdapterHub's no-adapter output
                v = _get(self.layer, site.norm).forward(h + r)
            else:
                v = h + r
            self.state[key] = v
        return v

    def missing(self, slot, what) -> None:
        which, k = slot
        site = self.sites[k]
        raise RuntimeError(
            f"afkern: the {site.location} site of {self.where} ({type(self.layer).__name__}) did not see its "
            f"{'hidden states' if which == 'h' else 'residual input'} ({what}) before its output was needed; "
            f"transformers {_tf_version()} runs this layer differently from what afkern's {self.family} site table "
            "expects (chunked feed-forward, or a changed layer forward)"
        )

    def __repr__(self) -> str:
        return f"LayerHooks({self.family} {self.where}: {[s.location for s in self.sites]})"


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def layer_hooks(model: nn.Module) -> Iterator[Tuple[str, LayerHooks]]:
    """(layer name, LayerHooks) for every hooked layer of ``model``."""
    for name, m in model.named_modules():
        lh = m.__dict__.get("_afkern_hooks")
        if lh is not None:
            yield name, lh


# ------------------------------------------------------------------------------------ install / remove
def hooked_sites(slots: Sequence[Slot], placed) -> List[Site]:
    """The hook sites of one layer's ``slots`` that need hooks; ``placed(slot)``: it gets a block."""
    out = []
    started = False
    for s in slots:
        if s.site.kind != "hook":
            continue
        has = placed(s)
        started = started or has
        if has or (started and s.stack.inline_residual):
            out.append(s.site)
    return out


def install_sites(model: nn.Module, builds: Sequence[Tuple[Slot, FusedAdapterBlock]], install_fn) -> List[LayerHooks]:
    """Put every block in place (``install_fn``: :func:`afkern.model.install`) and hook the layers
    whose hook sites got one. Everything is checked before the model is touched."""
    if not builds:
        return []
    family = builds[0][0].family
    have = {(id(s.layer), s.site.attr) for s, _ in builds}
    by_layer: Dict[int, List[Slot]] = {}
    for s in slots_of(model, family):
        by_layer.setdefault(id(s.layer), []).append(s)
    hooks: List[LayerHooks] = []
    for lid, layer_slots in by_layer.items():
        sites = hooked_sites(layer_slots, lambda s: (id(s.layer), s.site.attr) in have)
        if sites:
            if "_afkern_hooks" in layer_slots[0].layer.__dict__:
                raise ValueError(f"layer {layer_slots[0].path} is hooked already; patch a fresh model")
            lh = LayerHooks(layer_slots[0].layer, family, sites, layer_slots[0].path)
            lh.check()
            hooks.append(lh)
    plan = []
    for slot, block in builds:
        if slot.site.kind == "swap":
            parent_path, _, attr = slot.site.swap.rpartition(".")
            plan.append((_get(slot.layer, parent_path) if parent_path else slot.layer, attr, block))
        else:
            plan.append((slot.layer, slot.site.attr, block))
    install_fn(plan)
    for lh in hooks:
        lh.attach()
    return hooks


def remove_sites(model: nn.Module) -> nn.Module:
    """Remove every hook afkern installed, with the hook sites' blocks (swapped output modules stay
    fused blocks)."""
    for _, lh in list(layer_hooks(model)):
        for site in lh.sites:
            if site.attr in lh.layer._modules:
                delattr(lh.layer, site.attr)
        lh.detach()
    return model
