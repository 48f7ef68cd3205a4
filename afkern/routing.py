"""Several named fusions per model, and routing: each sequence of one batch through its own fusion
(or its own single adapter) in one forward (docs/DESIGN.md section 7).

AdapterHub runs one active setup per batch (``Parallel`` / ``BatchSplit`` cannot hold a ``Fuse``,
adapters issue #268); the paper's own setting is many target tasks, each with its fusion over the
same adapters. Here::

    afkern.add_fusion(model, "rte", ["sst2", "mnli", "qqp"])
    afkern.add_fusion(model, "mrpc", ["mnli", "qqp"], afkern.FusionConfig.static())
    with afkern.route(model, fusion=["rte", "mrpc", "rte"]):      # one entry per sequence
        out = model(input_ids, attention_mask=mask)

Each routed sequence's output equals that sequence run alone with its fusion active; in training
each fusion's parameters get gradient from their own sequences only. ``afkern.route(model,
adapter=[...])`` routes single adapters (no fusion): all stage-1 adapters trained in one run;
``afkern.route(model, setup=["rte", "sst2", ...])`` mixes the two kinds (each name a fusion or an
adapter): several tasks, fusion targets and stage-1 tasks, served in one batch.

Mechanism: :func:`route` validates the route against every block, then sets a context variable
(per thread and task); a block whose forward sees it for itself has the setup compiler
(``afkern.compiler``) sort the tokens by route (once per batch shape), run each fusion's
per-forward steps (temperature annealing, score dropout, controls) for the fusions present, and
hand the backend's one layer a segment plan (``afkern.ops.segments.SegmentPlan``): the plain
forward is the same layer with one segment.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Sequence, Union

import torch
import torch.nn as nn

from .block import check_adapter_names
from .compiler import ACTIVE_ROUTES, RouteState
from .config import FusionConfig
from .model import blocks_of, fused_blocks

__all__ = ["add_fusion", "set_active_fusion", "prune_fusion", "route", "fusion_names"]

RouteEntry = Union[str, int]


# ---------------------------------------------------------------------------------- named fusions
def fusion_names(model_or_block: nn.Module) -> List[str]:
    """The fusion names of a model (those of its first fused block, in order)."""
    return list(blocks_of(model_or_block, "fusions")[0].fusions)


def add_fusion(model: nn.Module, name: str, adapter_names: Sequence[str], fusion_config=None) -> nn.Module:
    """Add a fusion ``name`` over ``adapter_names`` (any subset of the model's adapters, in the
    fusion's order) with ``fusion_config`` (default dynamic) to every fused block, initialised as
    AdapterHub initialises one (each block draws its own). The active setup is unchanged
    (:func:`set_active_fusion`). Every block is checked first: an unknown adapter or a taken
    name raises ValueError and changes nothing. Returns ``model``."""
    blocks = blocks_of(model, "add_fusion")
    (name,) = check_adapter_names([name], "fusion name")
    names = check_adapter_names(adapter_names)
    fc = FusionConfig.load(fusion_config)
    for b in blocks:
        if name in b.fusions:
            raise ValueError(f"the model already has a fusion named {name!r}; fusions: {list(b.fusions)}")
        unknown = [n for n in names if n not in b.adapter_names]
        if unknown:
            raise ValueError(f"fusion {name!r} names adapters {unknown} that the model lacks; it has {b.adapter_names}")
    for b in blocks:
        b.add_fusion(name, names, fc)
    return model


def set_active_fusion(model: nn.Module, name: Union[str, int]) -> nn.Module:
    """Make fusion ``name`` (or its index in the model's fusion order) the active setup of every
    block; checks every block first."""
    blocks = blocks_of(model, "set_active_fusion")
    if isinstance(name, int) and not isinstance(name, bool):
        have = list(blocks[0].fusions)
        if not 0 <= name < len(have):
            raise ValueError(f"fusion index {name} out of range; the model has {len(have)} fusions {have}")
        name = have[name]
    for b in blocks:
        if name not in b.fusions:
            raise ValueError(f"unknown fusion {name!r}; the model has fusions {list(b.fusions)}")
    for b in blocks:
        b.set_active_fusion(name)
    return model


def prune_fusion(model: nn.Module, fusion: str, keep) -> nn.Module:
    """Restrict fusion ``fusion`` to the adapters ``keep`` (names; or {block name: names} per block,
    as ``afkern.train.prune.most_used`` gives), without retraining and without touching the
    model's other fusions: the adapters stay in the blocks for them. The fusion's softmax then runs
    over the kept adapters only: its output equals ``afkern.zero_adapters(model, rest, fusion=...)``.
    Every block is checked first. Returns ``model``."""
    blocks = dict(fused_blocks(model))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no FusedAdapterBlock")
    per = dict(keep) if isinstance(keep, dict) else {k: keep for k in blocks}
    unknown = sorted(set(per) - set(blocks))
    if unknown:
        raise ValueError(f"no fused blocks named {unknown}; the model has {sorted(blocks)}")
    plan = []
    for name, names in per.items():
        b = blocks[name]
        if fusion not in b.fusions:
            raise ValueError(f"unknown fusion {fusion!r}; {name} has fusions {list(b.fusions)}")
        names = [names] if isinstance(names, str) else list(names)
        f = b.fusions[fusion]
        bad = [n for n in names if n not in f.adapter_names]
        if bad:
            raise ValueError(f"adapters {bad} are not in fusion {fusion!r} at {name} (it has {f.adapter_names})")
        kept = [n for n in f.adapter_names if n in names]
        if not kept:
            raise ValueError(f"pruning fusion {fusion!r} at {name} would leave it no adapter")
        plan.append((b, f, kept))
    for b, f, kept in plan:
        f.adapter_names = kept
        if f.control is not None and f.control.n_adapters != len(kept):
            f.control = None  # a control over the old adapter list no longer applies
        b.invalidate_folded()
    return model


# ---------------------------------------------------------------------------------- routing
def _entries(values, what: str) -> list:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"a {what} route tensor must be 1-D integer, got {values.dtype} {tuple(values.shape)}")
        return values.tolist()
    if isinstance(values, (str, int)):
        raise TypeError(f"route takes one {what} per sequence (a list), got the single value {values!r}; "
                        f"for a whole batch through one {what} use [{values!r}] * batch_size")
    out = list(values)
    if not out:
        raise ValueError(f"the route is empty; give one {what} per sequence")
    bad = [v for v in out if isinstance(v, bool) or not isinstance(v, (str, int))]
    if bad:
        raise TypeError(f"route entries must be {what} names or indices, got {bad[:3]}")
    return out


def _resolve(entries: list, order: List[str], what: str) -> List[str]:
    names = []
    for v in entries:
        if isinstance(v, int):
            if not 0 <= v < len(order):
                raise ValueError(f"{what} index {v} out of range; the model has {len(order)} {what}s {order}")
            names.append(order[v])
        else:
            if v not in order:
                raise ValueError(f"unknown {what} {v!r} in the route; the model has {what}s {order}")
            names.append(v)
    return names


SETUP_PREFIXES = ("fusion:", "adapter:")  # spell a name that is both a fusion and an adapter


def setup_kinds(blocks, entries: Sequence[str], caller: str):
    """(names, kinds) of a list of setup entries, each a fusion or a single-adapter name of every
    block in ``blocks`` (``fusion:NAME`` / ``adapter:NAME`` where a name is both). ValueError /
    TypeError naming what was expected; nothing is written."""
    fusions, adapters = list(blocks[0].fusions), list(blocks[0].adapter_names)
    bad = [v for v in entries if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{caller} setups are adapter or fusion names (str), got {bad[:3]}")
    names, kinds = [], []
    for v in entries:
        is_f, is_a = v in fusions, v in adapters
        if not (is_f or is_a):
            pre = next((p for p in SETUP_PREFIXES if v.startswith(p)), None)
            if pre is not None and v[len(pre):] in (fusions if pre == "fusion:" else adapters):
                names.append(v[len(pre):])
                kinds.append(pre[:-1])
                continue
            raise ValueError(f"unknown setup {v!r}: the model has adapters {adapters} and fusions {fusions}")
        if is_f and is_a:
            raise ValueError(f"{v!r} names both a fusion and an adapter of the model; write 'fusion:{v}' or "
                             f"'adapter:{v}'")
        names.append(v)
        kinds.append("fusion" if is_f else "adapter")
    for b in blocks:
        missing = sorted({n for n, k in zip(names, kinds) if n not in (b.fusions if k == "fusion" else b.adapter_names)})
        if missing:
            raise ValueError(f"setups {missing} are missing in some blocks of the model")
    return names, kinds


@contextlib.contextmanager
def route(model: nn.Module, fusion=None, adapter=None, setup=None) -> Iterator[nn.Module]:
    """Context manager: the forwards inside run sequence i of the batch through fusion
    ``fusion[i]`` (a name, or an index in the model's fusion order), or through the single
    adapter ``adapter[i]`` (no fusion), or, kinds mixed, through ``setup[i]``: a fusion or an
    adapter name (``fusion:NAME`` / ``adapter:NAME`` where a name is both). For [tokens, hidden]
    inputs there is one entry per token.

    A routed output equals that sequence run alone with its fusion (adapter) active, padding and
    attention masks included; in training each fusion's parameters get gradient from their own
    sequences only. Each fusion present in a batch anneals its temperature and draws its score
    dropout once per forward, as it would alone. Everything is checked before the context is
    entered (unknown names, a model without fusions); the length when the batch arrives.
    """
    given = {k: v for k, v in (("fusion", fusion), ("adapter", adapter), ("setup", setup)) if v is not None}
    if len(given) != 1:
        raise ValueError("route takes exactly one of fusion=[...] (one fusion per sequence), adapter=[...] or "
                         f"setup=[...] (a fusion or adapter name per sequence); got {sorted(given) or 'none'}")
    ((kind, values),) = given.items()
    entries = _entries(values, kind)
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise ValueError("afkern.route does not reach into a torch.compile'd model (its graph runs the active setup); "
                         "route the uncompiled model")
    blocks = blocks_of(model, "routing")
    kinds = None
    if kind == "setup":
        names, kinds = setup_kinds(blocks, entries, "route")
        kind = kinds[0] if len(set(kinds)) == 1 else "mixed"
        kinds = kinds if kind == "mixed" else None
    elif kind == "fusion":
        order = list(blocks[0].fusions)
        if not order:
            raise ValueError("routing by fusion needs fusions; the model has none (afkern.add_fusion)")
        names = _resolve(entries, order, "fusion")
        for b in blocks:
            missing = sorted({n for n in names if n not in b.fusions})
            if missing:
                raise ValueError(f"fusions {missing} are missing in some blocks of the model (they have {list(b.fusions)})")
    else:
        order = list(blocks[0].adapter_names)
        names = _resolve(entries, order, "adapter")
        for b in blocks:
            missing = sorted({n for n in names if n not in b.adapter_names})
            if missing:
                raise ValueError(f"adapters {missing} are missing in some blocks of the model (they have {b.adapter_names})")
    state = RouteState(kind, names, frozenset(id(b) for b in blocks), kinds=kinds)
    token = ACTIVE_ROUTES.set(ACTIVE_ROUTES.get() + (state,))
    try:
        yield model
    finally:
        ACTIVE_ROUTES.reset(token)
