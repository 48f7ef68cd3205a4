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
adapter=[...])`` routes single adapters (no fusion): all stage-1 adapters trained in one run.

Mechanism: :func:`route` validates the route against every block, then sets a context variable;
a block whose ``adapter_forward`` sees it for itself calls :func:`routed_forward`, which sorts the
tokens by route (once per batch shape: :func:`afkern.ops.routed.route_plan`), runs each fusion's
per-forward steps (temperature annealing, score dropout, controls) for the fusions present, and
hands the backend's routed layer (the registry decides, ``afkern.backends.resolve_routed``) one
:class:`afkern.ops.routed.RoutedFusion` per segment.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .backends import REGISTRY, resolve_routed
from .block import FusedAdapterBlock, check_adapter_names
from .config import FusionConfig
from .fusion import AdapterFusion
from .model import blocks_of
from .ops.cache import Cache
from .ops.fold import fold_weights
from .ops.params import FusionParams
from .ops.routed import ACTIVE_ROUTES, RoutedFold, RoutedFusion, RoutePlan, current_route, route_plan

__all__ = ["add_fusion", "set_active_fusion", "prune_fusion", "route", "routed_forward", "current_route", "RouteState",
           "fusion_names", "routed_folded", "routed_folds", "routed_inputs", "routed_spec", "block_params", "single_spec"]

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
    from .model import fused_blocks

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
@dataclasses.dataclass
class RouteState:
    """An active route: ``kind`` ("fusion" or "adapter"), one name per sequence (or token), the
    blocks it covers, and the plans built so far (per batch shape and device)."""

    kind: str
    names: List[str]
    blocks: frozenset
    _plans: Cache = dataclasses.field(default_factory=Cache)

    def covers(self, block: FusedAdapterBlock) -> bool:
        return id(block) in self.blocks

    def plan(self, block: FusedAdapterBlock, lead: Tuple[int, ...], device) -> RoutePlan:
        """The plan for a forward whose inputs are [*lead, d]: lead (batch, seq) routes per
        sequence, lead (tokens,) per token. Raises ValueError (before anything runs) on a wrong
        length."""
        if len(lead) == 2:
            n, seq_len, what = lead[0], lead[1], "sequences"
        elif len(lead) == 1:
            n, seq_len, what = lead[0], 1, "tokens ([tokens, hidden] input: one entry per token)"
        else:
            raise ValueError(f"routing expects [batch, seq, hidden] or [tokens, hidden] inputs, got {len(lead) + 1}-D")
        if n != len(self.names):
            raise ValueError(f"the route has {len(self.names)} entries but the batch has {n} {what}; give one "
                             f"{self.kind} per {'sequence' if len(lead) == 2 else 'token'}")
        def build():
            order = list(block.fusions) if self.kind == "fusion" else list(block.adapter_names)
            codes = tuple(order.index(nm) for nm in self.names)
            # plans are pure functions of the route: shared by every route() of the same batch shape
            return _PLANS.get((codes, tuple(order), seq_len, str(device)),
                              lambda: route_plan(list(codes), order, seq_len, device))

        return self._plans.get((tuple(lead), str(device)), build)


#: route plans by (codes, order, seq_len, device), shared by every route() (one model, many threads)
_PLANS = Cache(limit=64)


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


@contextlib.contextmanager
def route(model: nn.Module, fusion=None, adapter=None) -> Iterator[nn.Module]:
    """Context manager: the forwards inside run sequence i of the batch through fusion
    ``fusion[i]`` (a name, or an index in the model's fusion order), or through the single
    adapter ``adapter[i]`` (no fusion). For [tokens, hidden] inputs there is one entry per token.

    A routed output equals that sequence run alone with its fusion (adapter) active, padding and
    attention masks included; in training each fusion's parameters get gradient from their own
    sequences only. Each fusion present in a batch anneals its temperature and draws its score
    dropout once per forward, as it would alone. Everything is checked before the context is
    entered (unknown names, a model without fusions); the length when the batch arrives.
    """
    if (fusion is None) == (adapter is None):
        raise ValueError("route takes exactly one of fusion=[...] (one fusion per sequence) or adapter=[...]")
    kind = "fusion" if fusion is not None else "adapter"
    entries = _entries(fusion if fusion is not None else adapter, kind)
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise ValueError("afkern.route does not reach into a torch.compile'd model (its graph runs the active setup); "
                         "route the uncompiled model")
    blocks = blocks_of(model, "routing")
    if kind == "fusion":
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
    state = RouteState(kind, names, frozenset(id(b) for b in blocks))
    token = ACTIVE_ROUTES.set(ACTIVE_ROUTES.get() + (state,))
    try:
        yield model
    finally:
        ACTIVE_ROUTES.reset(token)


# ---------------------------------------------------------------------------------- the block side
def block_params(block: FusedAdapterBlock) -> FusionParams:
    """The block's tensors over all N adapters, with its site norm, without fusion maps."""
    norm = block.site_norm()
    custom = norm is not None and not isinstance(norm, nn.LayerNorm)
    return FusionParams(
        ln_weight=None if norm is None else norm.weight, ln_bias=None if norm is None else norm.bias,
        down_weight=block.down_weight, down_bias=block.down_bias, up_weight=block.up_weight, up_bias=block.up_bias,
        norm_module=norm if custom else None,
    )


def _with_maps(P: FusionParams, fusion: AdapterFusion) -> FusionParams:
    g = lambda m, a: None if m is None else getattr(m, a)  # noqa: E731
    return P.replace(query_weight=g(fusion.query, "weight"), query_bias=g(fusion.query, "bias"),
                     key_weight=g(fusion.key, "weight"), key_bias=g(fusion.key, "bias"),
                     value_weight=g(fusion.value, "weight"))


def _fold_key(block: FusedAdapterBlock, fusion: AdapterFusion) -> tuple:
    sources = [block.down_weight, block.down_bias, block.up_weight, block.up_bias, *fusion.parameters()]
    return tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in sources) + (repr(fusion.config),)


def _fold_one(block: FusedAdapterBlock, fusion: AdapterFusion) -> RoutedFold:
    N, r = block.n_adapters, block.bottleneck
    spec = dataclasses.replace(block.spec(fusion), n_adapters=N)
    fw = fold_weights(_with_maps(block_params(block), fusion), spec)
    if fw.w_q is None:  # w_in = [Wd^T | w_q]: the Z part is shared by every fusion
        return RoutedFold(fw.w_in[:, N * r:], fw.b_in[N * r:], fw.w_out, fw.w_res)
    return RoutedFold(fw.w_q, fw.b_q, fw.w_out, fw.w_res)


def routed_folds(block: FusedAdapterBlock, names: Sequence[str]) -> List[RoutedFold]:
    """The folded inference maps over ALL of ``block``'s adapters (:class:`afkern.ops.routed.RoutedFold`)
    of the fusions ``names``.

    Every fusion of the block is folded into one stack per map (``w_q`` [F, d, N r + N], ``b_q``,
    ``w_out`` [F, N r + N, d]) and each fusion's maps are views of it: the segmented GEMMs of a
    batch whose fusions are consecutive in the stack read them as one strided [S, ...] tensor (a
    batched GEMM on CPU, the triton kernel without a copy). Cached like ``block.folded_weights``,
    keyed on the version counters and storage of every source tensor; a change refolds the
    fusions it touches. ``block.invalidate_folded`` drops it."""
    keys = {k: _fold_key(block, f) for k, f in block.fusions.items()}
    key = tuple(keys.items())

    def build():
        old = block._routed_cache.peek("folds") or ({}, {})
        folds = {k: (old[1][k] if k in old[1] and old[0].get(k) == fk else _fold_one(block, block.fusions[k]))
                 for k, fk in keys.items()}
        order = list(keys)
        stacks = [torch.stack([getattr(folds[k], a) for k in order]) for a in ("w_q", "b_q", "w_out")]
        return keys, {k: RoutedFold(stacks[0][i], stacks[1][i], stacks[2][i], folds[k].w_res) for i, k in enumerate(order)}

    folds = block._routed_cache.get(key, build, slot="folds")[1]
    return [folds[n] for n in names]


def routed_folded(block: FusedAdapterBlock, fusion: AdapterFusion) -> RoutedFold:
    """Fusion ``fusion``'s folded inference maps over all of ``block``'s adapters (:func:`routed_folds`)."""
    return routed_folds(block, [next(k for k, f in block.fusions.items() if f is fusion)])[0]


def _fusion_index(block: FusedAdapterBlock, fusion: AdapterFusion) -> Optional[torch.Tensor]:
    """The block's indices of the fusion's adapters (None: all, in block order); cached per
    (adapters, device) so a forward makes no host-to-device copy."""
    if fusion.adapter_names == block.adapter_names:
        return None
    dev = block.down_weight.device
    key = ("index", tuple(block.adapter_names), tuple(fusion.adapter_names), str(dev))
    return block._routed_cache.get(key, lambda: torch.tensor(
        [block.adapter_names.index(n) for n in fusion.adapter_names], device=dev))


def routed_inputs(block: FusedAdapterBlock, plan: RoutePlan, device, fold: bool,
                  with_params: bool = False) -> List[RoutedFusion]:
    """One :class:`afkern.ops.routed.RoutedFusion` per segment of ``plan``: each fusion present
    runs its per-forward steps here, once (temperature annealing, its score-dropout draw in
    training, its control), in segment order, so every backend sees the same draws.
    ``fold``: use the folded inference maps; ``with_params``: attach each fusion's FusionParams
    (the reference backend)."""
    inputs: List[RoutedFusion] = []
    g = lambda m, a: None if m is None else getattr(m, a)  # noqa: E731
    folds = routed_folds(block, plan.names) if fold else [None] * len(plan.names)
    for k, name in enumerate(plan.names):
        f = block.fusions[name]
        s, e = plan.bounds[k]
        fspec = block.spec(f)
        inv_t = 1.0 / f.begin_forward()
        score_scale = block.score_dropout_scale(e - s, device, f) if block.training and f.score_dropout > 0 else None
        prior = None
        if f.control is not None:
            prior, inv_t = f.control.row_inputs(fspec.n_adapters, inv_t, device, block.down_weight.dtype)
        inputs.append(RoutedFusion(
            index=_fusion_index(block, f), spec=fspec, query_weight=g(f.query, "weight"), query_bias=g(f.query, "bias"),
            key_weight=g(f.key, "weight"), key_bias=g(f.key, "bias"), value_weight=g(f.value, "weight"),
            inv_temperature=inv_t, score_scale=score_scale, prior=prior,
            folded=folds[k],
            params=block.params(f) if with_params else None,
        ))
    return inputs


def routed_spec(block: FusedAdapterBlock, fusion: AdapterFusion):
    """The block-level LayerSpec of a routed forward: the site (prologue, epilogue, activation)
    over all N adapters; the per-fusion flags travel in each RoutedFusion."""
    return dataclasses.replace(block.spec(fusion), n_adapters=block.n_adapters, query_before_ln=False,
                               residual_before=False, score_dropout=0.0)


def routed_forward(block: FusedAdapterBlock, h: torch.Tensor, residual_input: torch.Tensor,
                   state: RouteState) -> torch.Tensor:
    """``block.adapter_forward`` under a route: h, residual_input [..., d] -> [..., d]."""
    d = block.hidden_size
    lead = tuple(h.shape[:-1])
    plan = state.plan(block, lead, h.device)
    h2, x2 = h.reshape(-1, d), residual_input.reshape(-1, d)
    P = block_params(block)
    if state.kind == "adapter":
        adapters = [block.adapter_names.index(n) for n in plan.names]
        spec = dataclasses.replace(single_spec(block), active=adapters[0])
        backend = REGISTRY[resolve_routed(block.backend, h2.device, None, h2.dtype)]
        out = backend.routed_adapter_layer(h2, x2, P, spec, plan, adapters)
        return out.reshape(*lead, d)

    fusions = [block.fusions[n] for n in plan.names]
    spec = routed_spec(block, fusions[0])
    backend = REGISTRY[resolve_routed(block.backend, h2.device, spec, h2.dtype)]
    dropout = block.training and any(f.score_dropout > 0 for f in fusions)
    # the fold cache keys on data pointers, which torch.compile cannot trace
    fold = (backend.folds and not dropout and not torch.compiler.is_compiling()
            and not any(block._needs_grad(f) for f in fusions))
    inputs = routed_inputs(block, plan, h2.device, fold, with_params=backend.name == "reference")
    out, probs = backend.routed_layer(h2, x2, P, spec, plan, inputs)
    if block.record_fusion_weights:
        w = probs.detach().reshape(*lead, block.n_adapters)
        block.record(w, RecordedRoute(plan, w))
    return out.reshape(*lead, d)


@dataclasses.dataclass
class RecordedRoute:
    """Which fusion each token of the last recorded routed forward ran through (``afkern.analysis``);
    ``weights`` is the tensor recorded with it (a later plain forward replaces that)."""

    plan: RoutePlan
    weights: torch.Tensor

    def token_mask(self, name: str) -> torch.Tensor:
        """bool [tokens]: the tokens (batch order, flattened) routed to ``name``."""
        mask = torch.zeros(self.plan.tokens, dtype=torch.bool, device=self.weights.device)
        for k, n in enumerate(self.plan.names):
            if n == name:
                mask[self.plan.token_index(k).to(mask.device)] = True
        return mask


def single_spec(block: FusedAdapterBlock):
    """The single-adapter LayerSpec of the block's site (``active`` set by the caller)."""
    if block.fusion is None:
        return block.spec(None)
    ac = block.adapter_config
    return dataclasses.replace(
        block.spec(next(iter(block.fusions.values()))), n_adapters=block.n_adapters, fusion=False, query=True,
        key=True, value=True, query_before_ln=False, residual_before=False, score_dropout=0.0,
        adapter_dropout=float(ac.dropout) if block.training else 0.0)
