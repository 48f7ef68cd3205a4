"""Every setup of one batch in one pass: ``afkern.parallel(model, setups)``.

AdapterHub's ``Parallel(A, B)`` runs K single adapters over one batch of B and returns K·B rows,
setup j in rows j·B to (j+1)·B-1; it cannot hold a ``Fuse`` (adapters issue #268), so a user who
wants a fusion beside its adapters runs the model K times. Here::

    with afkern.parallel(model, ["sst2", "rte_fusion", "mnli"]):   # adapters and fusions, mixed
        out = model(input_ids, attention_mask=mask)                  # batch B in, 3·B rows out

Row j·B + i equals sequence i run with setup j active (tested in float64 at 1e-9 on every family).

Mechanism (state per call, docs/DESIGN.md section 7):

* **Replicate late.** Before the first layer that holds an adapter site every setup computes the
  same thing, so the batch is replicated there, not at the input: a forward pre-hook on each layer
  of a stack, from the first layer holding a fused block on, tiles every tensor argument whose
  leading dimension is the batch B (hidden states, attention masks, position embeddings, encoder
  states of a decoder's cross-attention) K times. Embeddings and the layers before the first site
  run once for B rows; tensors already K·B wide pass through, so a mask is tiled once per layer
  call (and cached per call).
* **Route.** A model-level pre-hook reads the batch size of this call and enters a per-call route
  with one entry per row (setup j for rows j·B to (j+1)·B-1); the blocks run each segment through
  its setup in one batched pass (``afkern.route``'s machinery). The hooks are installed while any
  ``parallel`` context of the model is open and read a context variable, so another thread calling
  the same model outside the context sees a plain forward.

On an accelerated AdapterHub model (``afkern.accelerate``) the setups are AdapterHub's names (an
adapter; a fusion as AdapterHub names it, ``"a,b"``, or a ``Fuse(...)``): AdapterHub's
``Parallel(A, B, Fuse(A, B))``, which it refuses. Same hooks, same per-call route, over the
model's bottleneck layers (``afkern/accelerate_routes.py``); a model that is not accelerated is
refused.

Limits: a forward with a KV cache (``past_key_values``, ``generate``) is refused, since the cache
of the first step would be B rows; ``labels`` given to the model are tiled K times with the rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .families import family_of
from .model import blocks_of
from .compiler import ACTIVE_ROUTES, RouteState
from .routing import setup_kinds
from .sites import base_model_of, slots_of

__all__ = ["parallel", "replicated_layers"]


@dataclasses.dataclass(frozen=True)
class _Setups:
    """One open ``parallel`` context: the model it is for and its K setups (names, kinds)."""

    model_id: int
    names: Tuple[str, ...]
    kind: str
    blocks: frozenset
    kinds: Tuple[str, ...] = ()


@dataclasses.dataclass
class _Call:
    """One forward under ``parallel``: batch size B, the setups, the tensors tiled so far."""

    setups: _Setups
    batch: int
    tiled: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)

    def tile(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` [B, ...] -> [K·B, ...] (setup j in rows j·B..); cached per source tensor."""
        hit = self.tiled.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        out = t.repeat(len(self.setups.names), *([1] * (t.dim() - 1)))
        self.tiled[id(t)] = (t, out)  # keeps t alive, so its id cannot be reused in this call
        return out


_OPEN: contextvars.ContextVar[tuple] = contextvars.ContextVar("afkern_parallel", default=())
_CALLS: contextvars.ContextVar[tuple] = contextvars.ContextVar("afkern_parallel_call", default=())
#: the context-variable tokens of each open call (route, call), reset by the post-hook
_STACK: contextvars.ContextVar[tuple] = contextvars.ContextVar("afkern_parallel_tokens", default=())
_LOCK = threading.Lock()
_HOOKS: Dict[int, list] = {}  # id(model) -> [open count, hook handles]; guarded by _LOCK

_BATCH_KW = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "hidden_states")


def _open_for(model: nn.Module) -> Optional[_Setups]:
    for s in reversed(_OPEN.get()):
        if s.model_id == id(model):
            return s
    return None


def _call_for(model_id: int) -> Optional[_Call]:
    for c in reversed(_CALLS.get()):
        if c.setups.model_id == model_id:
            return c
    return None


def _batch_size(args, kwargs) -> int:
    for k in _BATCH_KW:
        t = kwargs.get(k)
        if isinstance(t, torch.Tensor):
            return int(t.shape[0])
    for t in args:
        if isinstance(t, torch.Tensor):
            return int(t.shape[0])
    raise ValueError("afkern.parallel could not find the batch in the model's inputs (expected one of "
                     f"{', '.join(_BATCH_KW)} as a tensor)")


def _tile_tree(call: _Call, x):
    if isinstance(x, torch.Tensor):
        return call.tile(x) if x.dim() >= 2 and x.shape[0] == call.batch else x
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_tile_tree(call, v) for v in x)
    if isinstance(x, list):
        return [_tile_tree(call, v) for v in x]
    return x


class _ModelHooks:
    """The model-level pre-hook (open a per-call route) and post-hook (close it)."""

    @staticmethod
    def pre(module, args, kwargs):
        setups = _open_for(module)
        if setups is None:
            return None
        if kwargs.get("past_key_values") is not None:
            raise ValueError("afkern.parallel does not run forwards with a KV cache (past_key_values / generate): "
                             "the cache would hold B rows, not K·B; run generate once per setup")
        B = _batch_size(args, kwargs)
        call = _Call(setups, B)
        names = [n for n in setups.names for _ in range(B)]
        kinds = [k for k in setups.kinds for _ in range(B)] if setups.kind == "mixed" else None
        route = RouteState(setups.kind, names, setups.blocks, kinds=kinds)
        route_token = ACTIVE_ROUTES.set(ACTIVE_ROUTES.get() + (route,))
        call_token = _CALLS.set(_CALLS.get() + (call,))
        _STACK.set(_STACK.get() + ((route_token, call_token),))
        if "labels" in kwargs and isinstance(kwargs["labels"], torch.Tensor):
            kwargs = dict(kwargs, labels=call.tile(kwargs["labels"]) if kwargs["labels"].shape[0] == B
                          else kwargs["labels"])
            return args, kwargs
        return None

    @staticmethod
    def post(module, args, kwargs, output):
        if _open_for(module) is None or not _STACK.get():
            return None
        route_token, call_token = _STACK.get()[-1]
        _STACK.set(_STACK.get()[:-1])
        _CALLS.reset(call_token)
        ACTIVE_ROUTES.reset(route_token)
        return None



class _LayerHook:
    """Pre-hook of one layer: tile the B-row tensor arguments of this call to K·B rows."""

    def __init__(self, model_id: int):
        self.model_id = model_id

    def __call__(self, module, args, kwargs):
        call = _call_for(self.model_id)
        if call is None:
            return None
        return _tile_tree(call, tuple(args)), {k: _tile_tree(call, v) for k, v in kwargs.items()}


def replicated_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, layer) of every layer whose inputs ``parallel`` tiles: in each stack of the model's
    family, the first layer holding a fused block and every layer after it (a stack without blocks
    is left alone; its outputs are B rows, which the next stack's first hooked layer tiles)."""
    family = family_of(model)
    out: List[Tuple[str, nn.Module]] = []
    seen = set()
    by_stack: Dict[str, list] = {}
    for slot in slots_of(model, family):
        by_stack.setdefault(slot.stack.layers, []).append(slot)
    hub = _adapterhub(model)
    for i, (path, slots) in enumerate(by_stack.items()):
        parent = ".".join(path.split(".")[:-2])
        if hub and i > 0 and parent:
            # AdapterHub's decoder stack replicates its input_ids to its encoder states' rows (the
            # Parallel it knows) but not its masks: the whole decoder stack is tiled at its entry
            stack = base_model_of(model).get_submodule(parent)
            seen.add(id(stack))
            out.append((parent, stack))
        started = False
        for slot in slots:
            started = started or (_hub_site(slot.layer) if hub else slot.block() is not None)
            if started and id(slot.layer) not in seen:
                seen.add(id(slot.layer))
                out.append((slot.path, slot.layer))
    return out


def _adapterhub(model: nn.Module) -> Optional[str]:
    """"accelerated" / "plain" for an AdapterHub model (one with a BottleneckLayer), else None."""
    from .accelerate import is_accelerated
    from .accelerate_site import is_bottleneck

    try:
        if not any(is_bottleneck(m) for m in model.modules()):
            return None
    except ImportError:  # AdapterHub's adapters is not installed
        return None
    return "accelerated" if is_accelerated(model) else "plain"


def _hub_site(layer: nn.Module) -> bool:
    from .accelerate_site import ATTR

    return any(ATTR in m.__dict__ and len(m.adapters) > 0 for m in layer.modules())


def _install(model: nn.Module) -> None:
    with _LOCK:
        entry = _HOOKS.get(id(model))
        if entry is not None:
            entry[0] += 1
            return
        handles = [model.register_forward_pre_hook(_ModelHooks.pre, with_kwargs=True, prepend=True),
                   model.register_forward_hook(_ModelHooks.post, with_kwargs=True, always_call=True)]
        lh = _LayerHook(id(model))
        for _, layer in replicated_layers(model):
            handles.append(layer.register_forward_pre_hook(lh, with_kwargs=True, prepend=True))
        _HOOKS[id(model)] = [1, handles]


def _uninstall(model: nn.Module) -> None:
    with _LOCK:
        entry = _HOOKS[id(model)]
        entry[0] -= 1
        if entry[0] == 0:
            for h in entry[1]:
                h.remove()
            del _HOOKS[id(model)]


def _resolve_setups(model: nn.Module, setups: Sequence[str]):
    if isinstance(setups, str) or not isinstance(setups, (list, tuple)):
        raise TypeError(f"afkern.parallel takes a list of setup names (adapters or fusions), got {setups!r}")
    names = list(setups)
    if not names:
        raise ValueError("afkern.parallel needs at least one setup (an adapter or fusion name); got an empty list")
    hub = _adapterhub(model)
    if hub == "plain":
        raise ValueError(f"afkern.parallel: {type(model).__name__} is an AdapterHub model that afkern does not "
                         "compute; call afkern.accelerate(model) first")
    if hub == "accelerated":
        from .accelerate_routes import resolve_setups

        names, kinds, layers = resolve_setups(model, names)
    else:
        blocks = blocks_of(model, "afkern.parallel")
        names, kinds = setup_kinds(blocks, names, "afkern.parallel")
        layers = frozenset(id(b) for b in blocks)
    pairs = list(zip(kinds, names))
    twice = sorted({n for k, n in pairs if pairs.count((k, n)) > 1})
    if twice:
        raise ValueError(f"afkern.parallel got the setups {twice} more than once; each setup runs once")
    kind = kinds[0] if len(set(kinds)) == 1 else "mixed"
    return tuple(names), kind, layers, tuple(kinds)


@contextlib.contextmanager
def parallel(model: nn.Module, setups: Sequence[str]) -> Iterator[nn.Module]:
    """Context manager: a forward of a batch of B sequences inside it runs each of the K
    ``setups`` (single-adapter or fusion names, mixed) over the whole batch and returns K·B rows,
    setup j in rows j·B to (j+1)·B-1 (AdapterHub's ``Parallel`` layout), each equal to the model
    run with that setup active. On an accelerated AdapterHub model the setups are AdapterHub
    adapter and fusion names (``"a,b"``) or ``Fuse(...)`` objects. Everything is checked before the
    context opens: an unknown name, an empty list or a name twice raises and changes nothing."""
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise ValueError("afkern.parallel does not reach into a torch.compile'd model; use the uncompiled model")
    names, kind, blocks, kinds = _resolve_setups(model, setups)
    replicated_layers(model)  # raises before anything is installed if the model has no site table entry
    state = _Setups(id(model), names, kind, blocks, kinds)
    _install(model)
    token = _OPEN.set(_OPEN.get() + (state,))
    try:
        yield model
    finally:
        _OPEN.reset(token)
        _uninstall(model)
