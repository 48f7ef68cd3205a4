"""The setup compiler: a fused block plus its active setup, or a route, becomes the inputs of the one
layer (``afkern.ops.layer.fusion_layer``): spec, params, a segment plan with each segment's
folded weights, temperature, score-dropout draw and control (docs/DESIGN.md sections 7, 8 and 9).

It sits below both ``afkern.block`` (whose ``adapter_forward`` is :func:`forward`) and
``afkern.routing`` (the public API: ``route``, ``add_fusion``, ...), and holds every cache of a
forward in one place, each an :class:`afkern.ops.cache.Cache` (keyed, built under a lock):

* on a block: ``block._folded`` (each fusion's folded weights, keyed on the version counters and
  storage of its sources) and ``block._routed_cache`` (the folds of all fusions over all the
  block's adapters, stacked, and the index tensors of fusions over subsets);
* per route (``RouteState._plans``) and shared (``_PLANS``): the route plans per batch shape;
* ``kernels/segmented.py``: the stacked segment weights of the Triton segmented GEMM.

State per call: nothing a forward writes is read by another concurrent forward. The route is a
context variable (per thread, per asyncio task), the hook taps are per thread
(``afkern.sites``), the recorded fusion weights are per thread (``block.fusion_weights``).
What stays per model: a fusion's temperature clock (``AdapterFusion.begin_forward``), which
AdapterHub anneals once per call of the fusion layer in training and eval alike; it is the
model's training state (saved with it), so concurrent forwards of a model with an annealed
temperature each advance the one clock, as they would in AdapterHub.

This module works on any block object (``FusedAdapterBlock``) it is handed and imports no module
above it (block, model, routing).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .ops.activations import canonical_activation
from .backends import REGISTRY, resolve_backend, resolve_routed
from .ops.cache import Cache, version_key
from .ops.fold import FoldedWeights, fold_weights
from .ops.params import FusionParams, LayerSpec
from .ops.segments import RoutedFold, RoutePlan, Segment, SegmentPlan, route_plan

__all__ = ["ACTIVE_ROUTES", "current_route", "RouteState", "RecordedRoute", "forward", "block_spec", "block_params",
           "fusion_params", "folded_weights", "routed_folds", "segments", "adapter_segments", "routed_spec", "single_spec",
           "needs_grad", "by_kind",
           "ADAPTER_PARAMS"]

ADAPTER_PARAMS = ("down_weight", "down_bias", "up_weight", "up_bias")

#: The routes entered by ``afkern.route`` (innermost last); each says which blocks it covers.
ACTIVE_ROUTES: contextvars.ContextVar[tuple] = contextvars.ContextVar("afkern_route", default=())

#: route plans by (codes, order, seq_len, device), shared by every route() (one model, many threads)
_PLANS = Cache(limit=64)


def current_route(block) -> Optional["RouteState"]:
    """The innermost active route that covers ``block``, or None."""
    for state in reversed(ACTIVE_ROUTES.get()):
        if state.covers(block):
            return state
    return None


@dataclasses.dataclass
class RouteState:
    """An active route: ``kind`` ("fusion" or "adapter"), one name per sequence (or token), the
    blocks it covers, and the plans built so far (per batch shape and device)."""

    kind: str
    names: List[str]
    blocks: frozenset
    _plans: Cache = dataclasses.field(default_factory=Cache)
    kinds: Optional[List[str]] = None  # kind "mixed": each entry's own kind ("fusion" / "adapter")

    def covers(self, block) -> bool:
        return id(block) in self.blocks

    def plan(self, block, lead: Tuple[int, ...], device) -> RoutePlan:
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


# ---------------------------------------------------------------------------------- spec and params
#: one LayerSpec object per distinct setup: a spec is immutable, so every forward of a setup shares
#: one, built once (a frozen dataclass costs microseconds to construct, which a decoding step's
#: single token pays at every layer) and compared by identity first in the compile cache's key
_interned_spec = functools.lru_cache(maxsize=4096, typed=True)(LayerSpec)  # typed: True and 1 stay apart


def _layer_spec(**fields) -> LayerSpec:
    # torch.compile cannot trace an lru_cache: a traced forward builds its spec (a constant there)
    return LayerSpec(**fields) if torch.compiler.is_compiling() else _interned_spec(**fields)


def block_spec(block, fusion=None) -> LayerSpec:
    """The static description of ``block``'s setup ``fusion`` (None: its single active adapter)."""
    ac = block.adapter_config
    norm = block.site_norm()
    eps = 1e-12 if norm is None else float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-12)))
    common = dict(
        bottleneck=block.bottleneck, hidden=block.hidden_size,
        activation=canonical_activation(ac.non_linearity), original_ln_before=ac.original_ln_before,
        original_ln_after=ac.original_ln_after, residual_before_ln=ac.residual_before_ln,
        ln_eps=eps, layer_norm=norm is not None,
    )
    if fusion is None:
        return _layer_spec(n_adapters=block.n_adapters, fusion=False,
                           active=block.adapter_names.index(block.active_adapter),
                           adapter_dropout=float(ac.dropout) if block.training else 0.0, **common)
    fc = fusion.config
    return _layer_spec(
        n_adapters=len(fusion.adapter_names), fusion=True, query=fc.query, key=fc.key, value=fc.value,
        query_before_ln=fc.query_before_ln, residual_before=fc.residual_before,
        score_dropout=fusion.score_dropout, **common,
    )


def block_params(block) -> FusionParams:
    """The block's tensors over all N adapters, with its site norm, without fusion maps."""
    norm = block.site_norm()
    custom = norm is not None and not isinstance(norm, nn.LayerNorm)
    return FusionParams(
        ln_weight=None if norm is None else norm.weight, ln_bias=None if norm is None else norm.bias,
        down_weight=block.down_weight, down_bias=block.down_bias, up_weight=block.up_weight, up_bias=block.up_bias,
        norm_module=norm if custom else None,
    )


def _with_maps(P: FusionParams, fusion) -> FusionParams:
    q, k, v = fusion.query, fusion.key, fusion.value
    return FusionParams(P.ln_weight, P.ln_bias, P.down_weight, P.down_bias, P.up_weight, P.up_bias,
                        None if q is None else q.weight, None if q is None else q.bias,
                        None if k is None else k.weight, None if k is None else k.bias,
                        None if v is None else v.weight, P.norm_module)


def fusion_index(block, fusion) -> Optional[torch.Tensor]:
    """The block's indices of the fusion's adapters (None: all, in block order); cached per
    (adapters, device) so a forward makes no host-to-device copy."""
    if fusion.adapter_names == block.adapter_names:
        return None
    dev = block.down_weight.device
    key = ("index", tuple(block.adapter_names), tuple(fusion.adapter_names), str(dev))
    return block._routed_cache.get(key, lambda: torch.tensor(
        [block.adapter_names.index(n) for n in fusion.adapter_names], device=dev))


def fusion_params(block, fusion=None) -> FusionParams:
    """The tensors of setup ``fusion`` (None: the single adapters): the adapters it mixes (sliced,
    differentiably, when it mixes a subset), its query/key/value, the site's norm."""
    P = block_params(block)
    if fusion is None:
        return P
    idx = fusion_index(block, fusion)
    P = _with_maps(P, fusion)
    return P if idx is None else P.select(idx)


def _fold_sources(block, fusion) -> List[torch.Tensor]:
    """The tensors a fusion's folds are made of: the block's adapters and the fusion's maps (read
    from the modules' parameter dicts: a forward reads them every call)."""
    out = [block._parameters[n] for n in ADAPTER_PARAMS]
    for m in (fusion.query, fusion.key, fusion.value):
        if m is not None:
            out += [t for t in m._parameters.values() if t is not None]
    return out


def needs_grad(block, fusion, sources: Optional[Sequence[torch.Tensor]] = None) -> bool:
    """Whether the fusion's weights must stay unfolded: they need gradients now, or they are
    trainable and the block is training (reentrant gradient checkpointing runs the training
    forward under no_grad; it must compute what its recomputation does, and folding weights
    that change at every step would refold at every step)."""
    sources = _fold_sources(block, fusion) if sources is None else sources
    trainable = any(t.requires_grad for t in sources)
    return trainable and (torch.is_grad_enabled() or block.training)


# ---------------------------------------------------------------------------------- folded weights
def folded_weights(block, fusion, sources: Optional[Sequence[torch.Tensor]] = None) -> FoldedWeights:
    """Fusion ``fusion``'s folded inference weights over its own adapters (``block._folded``)."""
    name = next(k for k, f in block.fusions.items() if f is fusion)
    sources = _fold_sources(block, fusion) if sources is None else sources
    spec = block.spec(fusion)  # the fold depends on the setup too (an edited config refolds)
    return block._folded.get(version_key(sources) + (spec,), lambda: fold_weights(block.params(fusion), spec), slot=name)


def _fold_one(block, fusion) -> RoutedFold:
    N, r = block.n_adapters, block.bottleneck
    spec = dataclasses.replace(block_spec(block, fusion), n_adapters=N)
    fw = fold_weights(_with_maps(block_params(block), fusion), spec)
    if fw.w_q is None:  # w_in = [Wd^T | w_q]: the Z part is shared by every fusion
        return RoutedFold(fw.w_in[:, N * r:], fw.b_in[N * r:], fw.w_out, fw.w_res)
    return RoutedFold(fw.w_q, fw.b_q, fw.w_out, fw.w_res)


def routed_folds(block, names: Sequence[str]) -> List[RoutedFold]:
    """The folded inference maps over ALL of ``block``'s adapters (:class:`RoutedFold`) of the
    fusions ``names``.

    Every fusion of the block is folded into one stack per map (``w_q`` [F, d, N r + N], ``b_q``,
    ``w_out`` [F, N r + N, d]) and each fusion's maps are views of it: the segmented GEMMs of a
    batch whose fusions are consecutive in the stack read them as one strided [S, ...] tensor (a
    batched GEMM on CPU, the triton kernel without a copy). Keyed on the version counters and
    storage of every source tensor and each fusion's spec (as :func:`folded_weights`); a change refolds the fusions it
    touches. ``block.invalidate_folded`` drops it."""
    keys = {k: version_key(_fold_sources(block, f)) + (block_spec(block, f),) for k, f in block.fusions.items()}

    def build():
        old_keys, old = block._routed_cache.peek("folds") or ({}, {})
        folds = {k: (old[k] if k in old and old_keys.get(k) == fk else _fold_one(block, block.fusions[k]))
                 for k, fk in keys.items()}
        order = list(keys)
        stacks = [torch.stack([getattr(folds[k], a) for k in order]) for a in ("w_q", "b_q", "w_out")]
        return keys, {k: RoutedFold(stacks[0][i], stacks[1][i], stacks[2][i], folds[k].w_res) for i, k in enumerate(order)}

    folds = block._routed_cache.get(tuple(keys.items()), build, slot="folds")[1]
    return [folds[n] for n in names]


# ---------------------------------------------------------------------------------- segments
def _draws_score_dropout(block, fusion) -> bool:
    """Whether this forward of ``fusion`` draws a score-dropout mask (training, a positive rate):
    such a forward also runs unfolded (the fold drops the score terms dropout makes matter)."""
    return block.training and fusion.score_dropout > 0


def _steps_per_forward(block, fusion) -> bool:
    """Whether :func:`_fusion_segment` gives ``fusion`` a different segment at each forward: its
    temperature anneals, it draws score dropout, or it carries a control (read per forward)."""
    return bool(fusion.config.temperature) or fusion.control is not None or _draws_score_dropout(block, fusion)


def _fusion_segment(block, fusion, rows: int, device, dtype, index, folded, params: Optional[FusionParams],
                    active: bool = False, fspec: Optional[LayerSpec] = None) -> Segment:
    """One fusion's segment of this forward: its per-forward steps run here, once (temperature
    annealing, its score-dropout draw in training, its control). ``active``: the block's active
    fusion over every token (its draw is ``block.score_dropout_scale(tokens, device)``);
    ``params``: its FusionParams, for the reference backend (else None)."""
    fspec = fspec if fspec is not None else block.spec(fusion)
    inv_t = 1.0 / fusion.begin_forward()
    score_scale = None
    if _draws_score_dropout(block, fusion):
        score_scale = (block.score_dropout_scale(rows, device) if active
                       else block.score_dropout_scale(rows, device, fusion))
    prior = None
    if fusion.control is not None:
        prior, inv_t = fusion.control.row_inputs(fspec.n_adapters, inv_t, device, dtype)
    g = lambda m, a: None if m is None else getattr(m, a)  # noqa: E731
    return Segment(index=index, spec=fspec, query_weight=g(fusion.query, "weight"), query_bias=g(fusion.query, "bias"),
                   key_weight=g(fusion.key, "weight"), key_bias=g(fusion.key, "bias"),
                   value_weight=g(fusion.value, "weight"), inv_temperature=inv_t, score_scale=score_scale, prior=prior,
                   folded=folded, params=params)


def segments(block, plan: RoutePlan, device, fold: bool, with_params: bool = False) -> List[Segment]:
    """One :class:`Segment` per fusion segment of ``plan``, in segment order (so every backend
    sees the same draws). ``fold``: the folded maps over all adapters; ``with_params``: each
    fusion's FusionParams (the reference backend)."""
    folds = routed_folds(block, plan.names) if fold else [None] * len(plan.names)
    dtype = block.down_weight.dtype
    out = []
    for k, (name, (s, e)) in enumerate(zip(plan.names, plan.bounds)):
        f = block.fusions[name]
        out.append(_fusion_segment(block, f, e - s, device, dtype, fusion_index(block, f), folds[k],
                                   block.params(f) if with_params else None))
    return out


def routed_spec(block, fusion) -> LayerSpec:
    """The block-level LayerSpec of a routed forward: the site (prologue, epilogue, activation)
    over all N adapters; the per-fusion flags travel in each segment."""
    return dataclasses.replace(block_spec(block, fusion), n_adapters=block.n_adapters, query_before_ln=False,
                               residual_before=False, score_dropout=0.0)


def single_spec(block, active: int = 0) -> LayerSpec:
    """The single-adapter LayerSpec of the block's site, running adapter ``active``."""
    ac = block.adapter_config
    base = block_spec(block, next(iter(block.fusions.values()))) if block.fusions else block_spec(block, None)
    return dataclasses.replace(
        base, n_adapters=block.n_adapters, fusion=False, query=True, key=True, value=True, query_before_ln=False,
        residual_before=False, score_dropout=0.0, active=active,
        adapter_dropout=float(ac.dropout) if block.training else 0.0)


def adapter_segments(spec: LayerSpec, adapters: Sequence[int]) -> List[Segment]:
    """Single-adapter segments: adapter ``adapters[k]`` of the block (``spec``: the block's
    single-adapter spec) serves segment k."""
    return [Segment(index=None, spec=dataclasses.replace(spec, active=a), query_weight=None, query_bias=None,
                    key_weight=None, key_bias=None, value_weight=None) for a in adapters]


# ---------------------------------------------------------------------------------- the forward
def _compile_route(block, h2: torch.Tensor, lead, state: RouteState):
    """(backend, P, spec, plan, call) of a routed forward (``call`` None: ``backend.layer`` runs the plan)."""
    rows = state.plan(block, lead, h2.device)
    P = block_params(block)
    if state.kind == "adapter":
        adapters = [block.adapter_names.index(n) for n in rows.names]
        spec = single_spec(block, adapters[0])
        backend = REGISTRY[resolve_routed(block.backend, h2.device, None, h2.dtype)]
        return backend, P, spec, SegmentPlan(rows, adapter_segments(spec, adapters)), None
    fusions = [block.fusions[n] for n in rows.names]
    spec = routed_spec(block, fusions[0])
    backend = REGISTRY[resolve_routed(block.backend, h2.device, spec, h2.dtype)]
    dropout = any(_draws_score_dropout(block, f) for f in fusions)
    # the fold cache keys on data pointers, which torch.compile cannot trace
    fold = (backend.folds and not dropout and not torch.compiler.is_compiling()
            and not any(needs_grad(block, f) for f in fusions))
    segs = segments(block, rows, h2.device, fold, with_params=backend.name == "reference")
    return backend, P, spec, SegmentPlan(rows, segs), None


def _compile_active(block, h2: torch.Tensor):
    """(backend, P, spec, plan, call) of a forward of the active setup: the one-segment plan, and
    its layer with the decisions made where the backend binds one (``Backend.bind``), else None.

    At inference the whole compile is cached per block (``block._routed_cache`` slot "active"),
    keyed on everything it reads: the setup's spec (which reads the configs), the active setup,
    the backend setting, device and dtype, grad mode and training flag, and the storage and
    version counter of every source tensor (a later optimizer step, ``load_state_dict`` or weight
    replacement misses; so does a change of ``requires_grad``). A decoding step then pays one spec
    and one key, not the spec, backend resolution, params, fold lookup, plan and the layer's
    decisions (the bound call). The per-forward steps stay per forward: a fusion whose segment
    changes at each forward (:func:`_steps_per_forward`) is compiled every call."""
    fusion = block.fusion
    spec = block.spec(fusion)
    if fusion is None:
        backend = REGISTRY[resolve_backend(block.backend, h2.device, spec, h2.dtype)]
        return backend, block.params(None), spec, SegmentPlan(None, adapter_segments(spec, [spec.active])), None
    # the fold cache keys on data pointers, which torch.compile cannot trace (fullgraph):
    # compiled graphs run the unfolded layer and let the compiler plan the GEMMs
    compiling = torch.compiler.is_compiling()
    sources = None if compiling else _fold_sources(block, fusion)
    if compiling or _steps_per_forward(block, fusion):
        return _build_active(block, fusion, spec, h2, sources)
    key = ("active", spec, block.active_fusion, block.backend, h2.device, h2.dtype, torch.is_grad_enabled(),
           block.training, tuple(t.requires_grad for t in sources), version_key(sources))
    return block._routed_cache.get(key, lambda: _build_active(block, fusion, spec, h2, sources), slot="active")


def _build_active(block, fusion, spec: LayerSpec, h2: torch.Tensor, sources):
    backend = REGISTRY[resolve_backend(block.backend, h2.device, spec, h2.dtype)]
    P = block.params(fusion)
    folded = None
    if backend.folds and sources is not None and not _draws_score_dropout(block, fusion):
        if not needs_grad(block, fusion, sources):
            folded = folded_weights(block, fusion, sources)
    seg = _fusion_segment(block, fusion, h2.shape[0], h2.device, h2.dtype, None, folded,
                          P if backend.name == "reference" else None, active=True, fspec=spec)
    plan = SegmentPlan(None, [seg])
    bind = backend.bind if folded is not None else None
    return backend, P, spec, plan, (None if bind is None else bind(P, spec, plan, h2))


def forward(block, h: torch.Tensor, residual_input: torch.Tensor) -> torch.Tensor:
    """``block.adapter_forward``: AdapterHub's ``bottleneck_layer_forward(h, residual_input,
    layer_norm)`` for the block's active setup, or under ``afkern.route(...)`` each sequence
    through its own fusion or adapter; h, residual_input [..., d] -> [..., d]."""
    d = block.hidden_size
    lead = tuple(h.shape[:-1])
    h2, x2 = h.reshape(-1, d), residual_input.reshape(-1, d)
    state = None if torch.compiler.is_compiling() else current_route(block)
    if state is not None and state.kind == "mixed":
        return _mixed_forward(block, h, residual_input, state)
    if state is None:
        backend, P, spec, plan, call = _compile_active(block, h2)
    else:
        backend, P, spec, plan, call = _compile_route(block, h2, lead, state)
    if call is not None:  # the plan's layer with its decisions made (ops.layer.FoldedCall)
        out, probs = call(h2, x2)
    else:
        out, probs = backend.layer(h2, x2, P, spec, 1.0, None, None, None, plan)
    if block.record_fusion_weights and probs is not None:
        w = probs.detach().reshape(*lead, probs.shape[-1])
        block.record(w, None if plan.rows is None else RecordedRoute(plan.rows, w))
    return out.reshape(*lead, d)


def _mixed_forward(block, h: torch.Tensor, residual_input: torch.Tensor, state: RouteState) -> torch.Tensor:
    """A route whose entries mix fusions and single adapters (``afkern.parallel``): the sequences
    (or tokens) of each kind run as one routed layer call of that kind (:func:`by_kind`).
    ``state.kinds[i]`` is entry i's kind."""
    if tuple(h.shape[:-1])[0] != len(state.names):
        state.plan(block, tuple(h.shape[:-1]), h.device)  # raises the route-length error

    def run(kind, rows, h_k, x_k):
        sub = RouteState(kind, [state.names[i] for i in rows], state.blocks)
        token = ACTIVE_ROUTES.set(ACTIVE_ROUTES.get() + (sub,))
        try:
            return forward(block, h_k, x_k)
        finally:
            ACTIVE_ROUTES.reset(token)

    return by_kind(h, residual_input, state.kinds, run)


def by_kind(h: torch.Tensor, residual_input: torch.Tensor, kinds: Sequence[str], run) -> torch.Tensor:
    """Rows of ``h`` / ``residual_input`` [n, ...] grouped by ``kinds[i]`` ("fusion" first, then
    "adapter"): ``run(kind, rows, h_k, x_k)`` computes each group's rows, written back in place."""
    dtype = torch.promote_types(h.dtype, residual_input.dtype)
    groups = [(kind, rows) for kind in ("fusion", "adapter") for rows in [[i for i, k in enumerate(kinds) if k == kind]]
              if rows]
    if all(rows[-1] - rows[0] + 1 == len(rows) for _, rows in groups):  # each kind one run of rows
        # (afkern.parallel's layout): views in, one concatenation out
        parts = sorted((rows[0], run(kind, rows, h[rows[0]:rows[-1] + 1], residual_input[rows[0]:rows[-1] + 1]))
                       for kind, rows in groups)
        return torch.cat([p.to(dtype) for _, p in parts]) if len(parts) > 1 else parts[0][1].to(dtype)
    out = torch.empty(h.shape, dtype=dtype, device=h.device)
    for kind, rows in groups:
        idx = torch.tensor(rows, device=h.device)
        part = run(kind, rows, h.index_select(0, idx), residual_input.index_select(0, idx))
        out = out.index_copy(0, idx, part.to(out.dtype))
    return out
