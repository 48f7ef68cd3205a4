"""``FusedAdapterBlock``: N bottleneck adapters and their AdapterFusions at one adapter site.

At a BERT-style output module (``BertOutput`` / ``BertSelfOutput``) the block takes its place:
``forward(hidden_states, input_tensor)`` has that module's signature and semantics,
``dense -> dropout -> [N adapters + fusion, AdapterHub semantics] -> LayerNorm``. At the sites of
other families (docs/DESIGN.md section 6) the model's own code computes the sub-layer output ``h``
and the family's hooks call :meth:`FusedAdapterBlock.adapter_forward` (AdapterHub's
``bottleneck_layer_forward(h, residual_input, layer_norm)``) with the site's norm attached to the
block, or none at a norm-free site.

The adapters are held once, stacked; any number of named fusions over subsets of them live in
``block.fusions`` (:class:`afkern.fusion.AdapterFusion`). One setup is active: a fusion
(``active_fusion``) or a single adapter (``active_adapter``, as AdapterHub's
``set_active_adapters(name)``, for stage-1 training).
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import compiler
from .backends import check_name, resolve_backend
from .config import FusionConfig, load_adapter_config
from .fusion import AdapterFusion, FusionControl
from .ops.cache import Cache
from .ops.fold import FoldedWeights
from .ops.params import FusionParams, LayerSpec

__all__ = ["FusedAdapterBlock", "check_adapter_names"]

_ADAPTER_PARAMS = compiler.ADAPTER_PARAMS

#: what each thread's last recorded forward of a block saw: {block: (fusion weights, RecordedRoute)}
_RECORDS = threading.local()


def _records() -> "weakref.WeakKeyDictionary":
    r = getattr(_RECORDS, "by_block", None)
    if r is None:
        r = _RECORDS.by_block = weakref.WeakKeyDictionary()
    return r


def check_adapter_names(names, what: str = "adapter names") -> List[str]:
    """A non-empty list of distinct, non-empty strings without '.', or a ValueError/TypeError saying why."""
    names = [names] if isinstance(names, str) else (list(names) if names is not None else [])
    if not names:
        raise ValueError(f"at least one {what.rstrip('s')} is needed, got none")
    if any(not isinstance(n, str) or not n for n in names):
        raise TypeError(f"{what} must be non-empty strings, got {names!r}")
    dotted = [n for n in names if "." in n]
    if dotted:
        raise ValueError(f"{what} may not contain '.' (they become module names), got {dotted}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate {what} {dup} in {names}")
    return names


class FusedAdapterBlock(nn.Module):
    """N bottleneck adapters + their fusions at one adapter site.

    Args:
        hidden_size: d, the model width (``input_tensor`` and the output are [..., d]).
        adapter_names: names of the N adapters, in fusion order (AdapterHub's ``Fuse(...)`` order).
        adapter_config: :class:`AdapterConfig` (default Pfeiffer).
        fusion_config: :class:`FusionConfig` (default dynamic) of a fusion over all N adapters,
            named ``fusion_name`` (default AdapterHub's ``"a,b,c"``) and active; ``False`` for none:
            then exactly one adapter is active (``active_adapter``), as in single-task training.
        in_features: width of ``hidden_states`` (BERT's intermediate size for ``BertOutput``,
            d for ``BertSelfOutput``); default d.
        layer_norm_eps, hidden_dropout_prob: the wrapped module's settings.
        attention_probs_dropout_prob: AdapterHub's default score-dropout rate when a fusion's
            ``dropout_prob`` is None.
        backend: ``"auto"`` (default), ``"torch"``, ``"triton"``, ``"cuda"`` or ``"reference"``.
        layer_idx: the layer, for per-layer reduction factors.
        wrap_output: True (default) to own ``dense``, ``dropout`` and ``LayerNorm`` of an output
            module; False for a hooked site, whose norm is given by :meth:`attach_norm`.

    Parameters (AdapterHub names in brackets): ``dense``, ``LayerNorm`` (the wrapped module's);
    ``down_weight`` [N, r, d] (``adapter_down.0.weight``), ``down_bias`` [N, r];
    ``up_weight`` [N, r, d] (``adapter_up.weight`` transposed, float ``scaling`` folded in),
    ``up_bias`` [N, d]; ``fusions.<name>.query`` / ``key`` / ``value``
    (``adapter_fusion_layer.<name>.query`` ...).
    """

    def __init__(
        self,
        hidden_size: int,
        adapter_names: Sequence[str],
        adapter_config=None,
        fusion_config=None,
        in_features: Optional[int] = None,
        layer_norm_eps: float = 1e-12,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        backend: str = "auto",
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        fusion_name: Optional[str] = None,
        wrap_output: bool = True,
    ):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        names = check_adapter_names(adapter_names)
        self.adapter_config = load_adapter_config(adapter_config)
        self.adapter_names: List[str] = names
        self.hidden_size = hidden_size
        self.in_features = in_features or hidden_size
        self.layer_idx = layer_idx
        self.bottleneck = self.adapter_config.bottleneck(hidden_size, layer_idx)
        self.attention_probs_dropout_prob = float(attention_probs_dropout_prob)
        self.wraps_output = bool(wrap_output)
        fk = dict(device=device, dtype=dtype)
        N, r, d = len(names), self.bottleneck, hidden_size

        if self.wraps_output:  # the wrapped BertOutput / BertSelfOutput
            self.dense = nn.Linear(self.in_features, d, **fk)
            self.LayerNorm = nn.LayerNorm(d, eps=layer_norm_eps, **fk)
            self.dropout = nn.Dropout(hidden_dropout_prob)
        self._site_norm: Tuple[nn.Module, ...] = ()  # a hooked site's norm, not registered (the model owns it)

        self.down_weight = nn.Parameter(torch.empty(N, r, d, **fk))
        self.down_bias = nn.Parameter(torch.empty(N, r, **fk))
        self.up_weight = nn.Parameter(torch.empty(N, r, d, **fk))
        self.up_bias = nn.Parameter(torch.empty(N, d, **fk))
        self.reset_adapters()

        self.fusions = nn.ModuleDict()
        self.active_fusion: Optional[str] = None
        self.active_adapter: Optional[str] = None
        if fusion_config is False:
            self.active_adapter = names[0]
        else:
            self.add_fusion(fusion_name or ",".join(names), names, fusion_config)
            self.active_fusion = fusion_name or ",".join(names)
        self._backend = check_name(backend)
        self.record_fusion_weights = False
        # folded inference weights per fusion (slot: the fusion's name; key: its sources' versions)
        self._folded = Cache()
        # afkern.routing's folds over all adapters and index tensors of the fusions' subsets
        self._routed_cache = Cache()
        # inference-time controls of the fusions' weights (afkern.control) live on each fusion
        # (``fusion.control``); ``fusion_control`` is the active fusion's

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_adapters(self, index: Optional[int] = None) -> None:
        """Initialise adapter weights as AdapterHub's ``init_weights`` does (all, or adapter ``index``).

        With ``init_weights_seed`` set, every adapter starts from that seed (AdapterHub's
        ``fix_seed``: all adapters get the same initial weights), without touching torch's global RNG.
        """
        idx = range(len(self.adapter_names)) if index is None else [index]
        how = self.adapter_config.init_weights
        seed = self.adapter_config.init_weights_seed
        for n in idx:
            g = None if seed is None else torch.Generator(device=self.down_weight.device).manual_seed(int(seed))
            if how == "bert":
                self.down_weight[n].normal_(mean=0.0, std=0.02, generator=g)
                self.up_weight[n].normal_(mean=0.0, std=0.02, generator=g)
            elif how == "mam_adapter":
                w = torch.empty(self.bottleneck, self.hidden_size, dtype=self.down_weight.dtype, device=self.down_weight.device)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
                self.down_weight[n].copy_(w)
                self.up_weight[n].zero_()
            else:  # houlsby
                nn.init.trunc_normal_(self.down_weight[n], mean=0, std=1e-2, a=-2e-2, b=2e-2, generator=g)
                nn.init.trunc_normal_(self.up_weight[n], mean=0, std=1e-2, a=-2e-2, b=2e-2, generator=g)
            self.down_bias[n].zero_()
            self.up_bias[n].zero_()
            # afkern stores the up-projection with AdapterHub's float ``scaling`` folded in
            self.up_weight[n].mul_(self.adapter_config.scaling)

    @torch.no_grad()
    def reset_fusion(self) -> None:
        """Initialise every fusion's query/key/value (and temperature) as AdapterHub does."""
        for f in self.fusions.values():
            f.reset_parameters()

    # ------------------------------------------------------------------ fusions
    def add_fusion(self, name: str, adapter_names: Sequence[str], fusion_config=None,
                   score_dropout: Optional[float] = None) -> AdapterFusion:
        """Add a fusion ``name`` over ``adapter_names`` (a subset of this block's adapters, in the
        fusion's order), initialised as AdapterHub initialises one; returns it (not made active)."""
        (name,) = check_adapter_names([name], "fusion name")
        if name in self.fusions:
            raise ValueError(f"this block already has a fusion named {name!r}")
        names = check_adapter_names(adapter_names)
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise ValueError(f"fusion {name!r} names adapters {unknown} that the block lacks; it has {self.adapter_names}")
        fc = FusionConfig.load(fusion_config)
        rate = score_dropout if score_dropout is not None else (fc.dropout_prob or self.attention_probs_dropout_prob)
        w = self.down_weight
        fusion = AdapterFusion(self.hidden_size, names, fc, rate, device=w.device, dtype=w.dtype)
        fusion.train(self.training)
        self.fusions[name] = fusion
        return fusion

    def set_active_fusion(self, name: str) -> "FusedAdapterBlock":
        if name not in self.fusions:
            raise ValueError(f"unknown fusion {name!r}; the block has {list(self.fusions)}")
        self.active_fusion, self.active_adapter = name, None
        return self

    def set_active_adapter(self, name: str) -> "FusedAdapterBlock":
        """Run one adapter alone, without fusion (AdapterHub's ``set_active_adapters(name)``)."""
        if name not in self.adapter_names:
            raise ValueError(f"unknown adapter {name!r}; the block has {self.adapter_names}")
        self.active_fusion, self.active_adapter = None, name
        return self

    @property
    def fusion(self) -> Optional[AdapterFusion]:
        """The active fusion (None when a single adapter is active)."""
        return None if self.active_fusion is None else self.fusions[self.active_fusion]

    @property
    def fusion_control(self) -> Optional[FusionControl]:
        """The active fusion's inference-time control (``afkern.control``), or None. Each fusion keeps
        its own (``fusion.control``), so switching the active fusion does not lose one."""
        f = self.fusion
        return None if f is None else f.control

    @fusion_control.setter
    def fusion_control(self, control: Optional[FusionControl]) -> None:
        f = self.fusion
        if f is None:
            if control is not None:
                raise ValueError("fusion controls belong to a fusion; this block runs a single adapter")
            return
        f.control = control

    @property
    def fusion_config(self) -> Optional[FusionConfig]:
        """The active fusion's config, or None when a single adapter is active."""
        f = self.fusion
        return None if f is None else f.config

    @property
    def query(self) -> Optional[nn.Linear]:
        f = self.fusion
        return None if f is None else f.query

    @property
    def key(self) -> Optional[nn.Linear]:
        f = self.fusion
        return None if f is None else f.key

    @property
    def value(self) -> Optional[nn.Linear]:
        f = self.fusion
        return None if f is None else f.value

    @property
    def score_dropout(self) -> float:
        """The active fusion's score-dropout rate in training (0 without a fusion)."""
        f = self.fusion
        return 0.0 if f is None else f.score_dropout

    @score_dropout.setter
    def score_dropout(self, rate: float) -> None:
        if self.fusion is None:
            raise ValueError("this block has no active fusion; set_active_fusion first")
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"score dropout must be in [0, 1), got {rate!r}")
        self.fusion.score_dropout = float(rate)

    @property
    def temperature(self) -> float:
        """The active fusion's softmax temperature (1 without a fusion)."""
        f = self.fusion
        return 1.0 if f is None else f.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if self.fusion is None:
            raise ValueError("this block has no active fusion; set_active_fusion first")
        self.fusion.temperature = value

    # ------------------------------------------------------------------ state
    @property
    def n_adapters(self) -> int:
        return len(self.adapter_names)

    def get_extra_state(self) -> torch.Tensor:
        # [index of the active adapter or -1, index of the active fusion or -1], float64 so every
        # consumer of state_dict (safetensors, weights_only loads, the ONNX exporters) can hold it.
        a = -1 if self.active_adapter is None else self.adapter_names.index(self.active_adapter)
        f = -1 if self.active_fusion is None else list(self.fusions).index(self.active_fusion)
        return torch.tensor([float(a), float(f)], dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        a, f = (int(v) for v in torch.as_tensor(state).reshape(-1)[:2].tolist())
        if 0 <= f < len(self.fusions):
            self.set_active_fusion(list(self.fusions)[f])
        elif 0 <= a < self.n_adapters:
            self.set_active_adapter(self.adapter_names[a])

    @property
    def backend(self) -> str:
        return self._backend

    def set_backend(self, name: str) -> "FusedAdapterBlock":
        """Choose the backend; a named backend that cannot run on this block's device or setup raises now."""
        name = check_name(name)
        if name != "auto":
            resolve_backend(name, self.down_weight.device, self.spec())
        self._backend = name
        return self

    def resolved_backend(self, device=None, dtype=None) -> str:
        """The concrete backend the next forward on ``device`` (in ``dtype``) will use."""
        return resolve_backend(self._backend, device or self.down_weight.device, self.spec(), dtype)

    def site_norm(self) -> Optional[nn.Module]:
        """The norm AdapterHub hands the adapters at this site: the wrapped LayerNorm, the attached
        one of a hooked site, or None (a norm-free site)."""
        if self.wraps_output:
            return self.LayerNorm
        return self._site_norm[0] if self._site_norm else None

    def attach_norm(self, norm: Optional[nn.Module]) -> "FusedAdapterBlock":
        """Give a hooked site (``wrap_output=False``) its norm module (owned by the model, so it is
        not registered here), or None for a norm-free site."""
        if self.wraps_output:
            raise ValueError("attach_norm is for hooked sites; this block wraps an output module's LayerNorm")
        self._site_norm = () if norm is None else (norm,)
        return self

    def spec(self, fusion: Optional[AdapterFusion] = None) -> LayerSpec:
        """The static description of the active setup (or of ``fusion``)."""
        return compiler.block_spec(self, fusion if fusion is not None else self.fusion)

    def params(self, fusion: Optional[AdapterFusion] = None) -> FusionParams:
        """The tensors of the active setup (or of ``fusion``): the adapters it mixes (sliced,
        differentiably, when it mixes a subset), its query/key/value, the site's norm."""
        return compiler.fusion_params(self, fusion if fusion is not None else self.fusion)

    def folded_weights(self, fusion: Optional[AdapterFusion] = None) -> FoldedWeights:
        """Inference weights of a fusion (default: the active one) with the frozen products folded;
        recomputed whenever any source tensor changed through torch (optimizer steps, in-place ops,
        ``load_state_dict``, reassignment, dtype or device moves: each bumps the tensor's version
        counter or moves its storage).

        Writes through ``param.data`` bypass the version counter: call :meth:`invalidate_folded`
        after such a write (``train()`` / ``eval()`` also invalidate)."""
        fusion = fusion if fusion is not None else self.fusion
        if fusion is None:
            raise ValueError("folded weights belong to a fusion; this block runs a single adapter")
        return compiler.folded_weights(self, fusion)

    def cached_folded(self) -> Optional[FoldedWeights]:
        """The active fusion's folded weights if a no-grad forward has folded them (else None)."""
        return self._folded.peek(self.active_fusion) if self.active_fusion is not None else None

    def invalidate_folded(self) -> "FusedAdapterBlock":
        """Drop the folded inference weights; the next no-grad forward folds afresh."""
        self._folded.clear()
        self._routed_cache.clear()
        return self

    # ------------------------------------------------------------------ recorded fusion weights
    @property
    def fusion_weights(self) -> Optional[torch.Tensor]:
        """The softmax weights [..., N] of this thread's last forward of the block while
        ``record_fusion_weights`` was on (detached, on the device), or None. Per thread: a forward
        in another thread does not replace it."""
        rec = _records().get(self)
        return None if rec is None else rec[0]

    @fusion_weights.setter
    def fusion_weights(self, weights: Optional[torch.Tensor]) -> None:
        self.record(weights)

    @property
    def fusion_route(self):
        """The route of this thread's last recorded forward (``afkern.compiler.RecordedRoute``), or
        None after a plain forward."""
        rec = _records().get(self)
        return None if rec is None else rec[1]

    def record(self, weights: Optional[torch.Tensor], route=None) -> None:
        """Record a forward's fusion weights (and its route) for this thread."""
        _records()[self] = (weights, route)

    def train(self, mode: bool = True) -> "FusedAdapterBlock":
        self.invalidate_folded()
        return super().train(mode)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> None:
        if not isinstance(hidden_states, torch.Tensor) or not isinstance(input_tensor, torch.Tensor):
            raise TypeError("FusedAdapterBlock.forward expects two tensors (hidden_states, input_tensor)")
        width = self.in_features if self.wraps_output else self.hidden_size
        if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != width:
            raise ValueError(
                f"hidden_states must be [batch, seq, {width}] or [tokens, {width}], got {tuple(hidden_states.shape)}"
            )
        if input_tensor.shape[:-1] != hidden_states.shape[:-1] or input_tensor.shape[-1] != self.hidden_size:
            raise ValueError(
                f"input_tensor must be {tuple(hidden_states.shape[:-1]) + (self.hidden_size,)} to match "
                f"hidden_states {tuple(hidden_states.shape)}, got {tuple(input_tensor.shape)}"
            )
        w = self.down_weight
        for name, t in (("hidden_states", hidden_states), ("input_tensor", input_tensor)):
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
            if t.device != w.device:
                raise ValueError(f"{name} is on {t.device} but the block's weights are on {w.device}")
        if torch.is_autocast_enabled(hidden_states.device.type):
            return  # autocast mixes dtypes on purpose (a bf16 sub-layer output, a float32 residual)
        if hidden_states.dtype != input_tensor.dtype:
            raise TypeError(f"hidden_states ({hidden_states.dtype}) and input_tensor ({input_tensor.dtype}) dtypes differ")
        if hidden_states.dtype != w.dtype:
            raise TypeError(
                f"inputs are {hidden_states.dtype} but the block's weights are {w.dtype}; cast the model "
                "(model.to(dtype)) or run under torch.autocast"
            )

    def score_dropout_scale(self, tokens: int, device, fusion: Optional[AdapterFusion] = None) -> torch.Tensor:
        """The score-dropout scale [tokens, N] of one training forward: 0 for a dropped score,
        1/(1-p) for a kept one (nn.Dropout's rule). Drawn from torch's RNG, so ``torch.manual_seed``
        reproduces it; every backend, forward and backward, uses this one tensor.

        It is nn.Dropout's own draw (``F.dropout`` of ones: bernoulli(1 - p), then / (1 - p)) on
        the [tokens, N] scores that AdapterHub's ``BertFusion.dropout`` sees, so under the same seed
        and the same sequence of RNG calls the mask is AdapterHub's mask, value for value."""
        fusion = fusion if fusion is not None else self.fusion
        rate = fusion.score_dropout
        ones = torch.ones(tokens, len(fusion.adapter_names), device=device, dtype=torch.float32)
        return nn.functional.dropout(ones, rate, training=True)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        self._check_inputs(hidden_states, input_tensor)
        h = self.dropout(self.dense(hidden_states)) if self.wraps_output else hidden_states
        return self.adapter_forward(h, input_tensor)

    def adapter_forward(self, h: torch.Tensor, residual_input: torch.Tensor) -> torch.Tensor:
        """AdapterHub's ``bottleneck_layer_forward(h, residual_input, layer_norm)`` for the active
        setup, with this site's norm; h, residual_input [..., d] -> [..., d]. Under
        ``afkern.route(...)`` each sequence runs through its own fusion or adapter instead
        (``afkern.compiler.forward``: the setup becomes a segment plan of the one layer)."""
        return compiler.forward(self, h, residual_input)

    def extra_repr(self) -> str:
        setup = f"fusion={self.active_fusion!r}" if self.fusion is not None else f"adapter={self.active_adapter!r}"
        return (
            f"in_features={self.in_features}, hidden={self.hidden_size}, adapters={self.adapter_names}, "
            f"bottleneck={self.bottleneck}, activation={self.adapter_config.non_linearity}, {setup}, "
            f"backend={self._backend}"
        )

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_output_module(cls, module: nn.Module, adapter_names: Sequence[str], adapter_config=None,
                           fusion_config=None, attention_probs_dropout_prob: float = 0.1, backend: str = "auto",
                           layer_idx: Optional[int] = None, fusion_name: Optional[str] = None) -> "FusedAdapterBlock":
        """Build a block around an existing ``BertOutput``-like module (``dense``, ``LayerNorm``,
        ``dropout``), sharing its dense and LayerNorm parameters."""
        for attr in ("dense", "LayerNorm", "dropout"):
            if not hasattr(module, attr):
                raise TypeError(f"{type(module).__name__} has no {attr!r}; expected a BertOutput-like module")
        dense, ln = module.dense, module.LayerNorm
        w = dense.weight
        block = cls(
            hidden_size=dense.out_features, adapter_names=adapter_names, adapter_config=adapter_config,
            fusion_config=fusion_config, in_features=dense.in_features,
            layer_norm_eps=float(getattr(ln, "eps", getattr(ln, "variance_epsilon", 1e-12))),  # DebertaLayerNorm
            attention_probs_dropout_prob=attention_probs_dropout_prob, backend=backend, layer_idx=layer_idx,
            device=w.device, dtype=w.dtype, fusion_name=fusion_name,
        )
        block.dense = dense
        block.LayerNorm = ln
        block.dropout = module.dropout
        return block

    @torch.no_grad()
    def set_adapter_weights(self, index: int, down_weight, down_bias, up_weight, up_bias) -> None:
        """Copy one adapter's nn.Linear-layout weights in (``up_weight`` is [d, r] as in nn.Linear);
        the block's float ``adapter_config.scaling`` is folded into the up-projection."""
        r, d = self.bottleneck, self.hidden_size
        expect = {"down_weight": (r, d), "down_bias": (r,), "up_weight": (d, r), "up_bias": (d,)}
        got = {"down_weight": down_weight, "down_bias": down_bias, "up_weight": up_weight, "up_bias": up_bias}
        for k, shape in expect.items():
            if tuple(got[k].shape) != shape:
                raise ValueError(
                    f"adapter {self.adapter_names[index]!r} {k} must be {shape} for hidden size {d} and "
                    f"bottleneck {r}, got {tuple(got[k].shape)}"
                )
        self.down_weight[index].copy_(down_weight)
        self.down_bias[index].copy_(down_bias)
        s = self.adapter_config.scaling
        self.up_weight[index].copy_(up_weight.t() * s)
        self.up_bias[index].copy_(up_bias * s)

    def adapter_state(self, index: int) -> dict:
        """One adapter's weights in AdapterHub's nn.Linear layout (keys as under ``adapters.<name>.``)."""
        s = self.adapter_config.scaling
        return {
            "adapter_down.0.weight": self.down_weight[index].detach().clone(),
            "adapter_down.0.bias": self.down_bias[index].detach().clone(),
            "adapter_up.weight": (self.up_weight[index].detach().t() / s).contiguous(),
            "adapter_up.bias": self.up_bias[index].detach() / s,
        }

    def freeze_adapters(self, freeze: bool = True) -> "FusedAdapterBlock":
        for p in (self.down_weight, self.down_bias, self.up_weight, self.up_bias):
            p.requires_grad_(not freeze)
        return self

    def sibling(self, adapter_names: Sequence[str]) -> "FusedAdapterBlock":
        """A new block at this block's site: same width, placement, config and backend, the wrapped
        dense / LayerNorm / dropout (or the site's norm) shared, adapters ``adapter_names``
        (freshly initialised) and no fusion. The building block of select_adapters and add_adapters."""
        w = self.down_weight
        new = FusedAdapterBlock(
            hidden_size=self.hidden_size, adapter_names=adapter_names, adapter_config=self.adapter_config,
            fusion_config=False, in_features=self.in_features, backend=self._backend, layer_idx=self.layer_idx,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob, device=w.device, dtype=w.dtype,
            wrap_output=self.wraps_output,
        )
        if self.wraps_output:
            new.dense, new.LayerNorm, new.dropout = self.dense, self.LayerNorm, self.dropout
        new._site_norm = self._site_norm
        return new

    @torch.no_grad()
    def select_adapters(self, names: Sequence[str]) -> "FusedAdapterBlock":
        """A new block holding only the adapters ``names`` (in that order) and its fusions over them.

        The one way afkern takes a subset of adapters (``afkern.select_adapters``,
        ``afkern.drop_adapters``, pruning). The stacked ``[N, ...]`` adapter parameters are copied
        (``requires_grad`` kept); the wrapped dense / LayerNorm / dropout (or the site's norm) are
        shared with this block. Each fusion keeps the adapters it had that remain (its softmax then
        runs over those only: the output of the trained fusion with the others zeroed, see
        ``afkern.zero_adapters``), with its query / key / value, temperature and score dropout
        copied; a fusion left with none is dropped. Raises ValueError, changing nothing, if the
        active setup would lose everything: the active single adapter, or every adapter of the
        active fusion.
        """
        names = check_adapter_names(names)
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; the block has {self.adapter_names}")
        if self.active_adapter is not None and self.active_adapter not in names:
            raise ValueError(f"the active adapter {self.active_adapter!r} would be removed; keep it or "
                             "set_active_adapter to one of the kept adapters first")
        kept_fusions = {k: [n for n in f.adapter_names if n in names] for k, f in self.fusions.items()}
        if self.active_fusion is not None and not kept_fusions[self.active_fusion]:
            raise ValueError(f"the active fusion {self.active_fusion!r} would be left with no adapter")
        renamed = {k: (",".join(kept) if kept and k == ",".join(self.fusions[k].adapter_names) else k)
                   for k, kept in kept_fusions.items()}
        live = [renamed[k] for k, kept in kept_fusions.items() if kept]
        taken = [n for n in live if live.count(n) > 1]
        if taken:
            raise ValueError(f"keeping {names} would give two fusions the name {taken[0]!r}")
        w = self.down_weight
        new = self.sibling(names)
        ix = torch.tensor([self.adapter_names.index(n) for n in names], device=w.device)
        for pname in _ADAPTER_PARAMS:
            src = getattr(self, pname)
            getattr(new, pname).copy_(src.index_select(0, ix))
            getattr(new, pname).requires_grad_(src.requires_grad)
        for k, f in self.fusions.items():
            if not kept_fusions[k]:
                continue
            # a fusion under AdapterHub's default name ("a,b,c") keeps the default name of what it keeps
            nk = renamed[k]
            nf = new.add_fusion(nk, kept_fusions[k], f.config, score_dropout=f.score_dropout)
            nf.load_state_dict(f.state_dict())
            for p_src, p_dst in zip(f.parameters(), nf.parameters()):
                p_dst.requires_grad_(p_src.requires_grad)
        if self.active_fusion is not None:
            new.set_active_fusion(renamed[self.active_fusion])
        else:
            new.set_active_adapter(self.active_adapter)
        new.record_fusion_weights = self.record_fusion_weights
        new.train(self.training)
        return new
