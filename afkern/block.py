"""``FusedAdapterBlock``: a drop-in for BERT's ``BertOutput`` / ``BertSelfOutput`` that holds N
bottleneck adapters and their AdapterFusion as stacked parameters.

``forward(hidden_states, input_tensor)`` has BertOutput's signature and semantics:
``dense -> dropout -> [N adapters + fusion, AdapterHub semantics] -> LayerNorm``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .activations import canonical_activation
from .backends import get_layer_fn, resolve_backend, _check_name
from .config import FusionConfig, load_adapter_config
from .ops.fusion import FoldedWeights, fold_weights
from .ops.params import FusionParams, LayerSpec

__all__ = ["FusedAdapterBlock"]

_T_START = 50.0


def _bert_normal_(t: torch.Tensor) -> None:
    t.normal_(mean=0.0, std=0.02)


class FusedAdapterBlock(nn.Module):
    """N bottleneck adapters + AdapterFusion in place of a BERT output module.

    Args:
        hidden_size: d, the model width (``input_tensor`` and the output are [..., d]).
        adapter_names: names of the N adapters, in fusion order (AdapterHub's ``Fuse(...)`` order).
        adapter_config: :class:`AdapterConfig` (default Pfeiffer).
        fusion_config: :class:`FusionConfig` (default dynamic); ``False`` for no fusion: then
            exactly one adapter is active (``active_adapter``), as in single-task training.
        in_features: width of ``hidden_states`` (BERT's intermediate size for ``BertOutput``,
            d for ``BertSelfOutput``); default d.
        layer_norm_eps, hidden_dropout_prob: the wrapped module's settings.
        attention_probs_dropout_prob: AdapterHub's default score-dropout rate when
            ``fusion_config.dropout_prob`` is None.
        backend: ``"auto"`` (default), ``"torch"``, ``"triton"``, ``"cuda"`` or ``"reference"``.
        layer_idx: the encoder layer, for per-layer reduction factors.

    Parameters (AdapterHub names in brackets): ``dense``, ``LayerNorm`` (the wrapped module's);
    ``down_weight`` [N, r, d] (``adapter_down.0.weight``), ``down_bias`` [N, r];
    ``up_weight`` [N, r, d] (``adapter_up.weight`` transposed), ``up_bias`` [N, d];
    ``query``, ``key``, ``value`` (``adapter_fusion_layer.<names>.query`` ...).
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
    ):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        names = list(adapter_names) if adapter_names is not None else []
        if not names:
            raise ValueError("FusedAdapterBlock needs at least one adapter name, got none")
        if any(not isinstance(n, str) or not n for n in names):
            raise TypeError(f"adapter names must be non-empty strings, got {names!r}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate adapter names {dup} in {names}")
        self.adapter_config = load_adapter_config(adapter_config)
        self.fusion_config = None if fusion_config is False else FusionConfig.load(fusion_config)
        self.adapter_names: List[str] = names
        self.hidden_size = hidden_size
        self.in_features = in_features or hidden_size
        self.layer_idx = layer_idx
        self.bottleneck = self.adapter_config.bottleneck(hidden_size, layer_idx)
        self.active_adapter: Optional[str] = None if self.fusion_config is not None else names[0]
        fk = dict(device=device, dtype=dtype)
        N, r, d = len(names), self.bottleneck, hidden_size

        # the wrapped BertOutput / BertSelfOutput
        self.dense = nn.Linear(self.in_features, d, **fk)
        self.LayerNorm = nn.LayerNorm(d, eps=layer_norm_eps, **fk)
        self.dropout = nn.Dropout(hidden_dropout_prob)

        self.down_weight = nn.Parameter(torch.empty(N, r, d, **fk))
        self.down_bias = nn.Parameter(torch.empty(N, r, **fk))
        self.up_weight = nn.Parameter(torch.empty(N, r, d, **fk))
        self.up_bias = nn.Parameter(torch.empty(N, d, **fk))
        self.reset_adapters()

        fc = self.fusion_config
        self.score_dropout = 0.0
        self._temperature = 1.0
        if fc is not None:
            self.query = nn.Linear(d, d, **fk) if fc.query else None
            self.key = nn.Linear(d, d, **fk) if fc.key else None
            self.value = nn.Linear(d, d, bias=False, **fk) if fc.value else None
            self.score_dropout = float(fc.dropout_prob if fc.dropout_prob else attention_probs_dropout_prob)
            self._temperature = _T_START if fc.temperature else 1.0
            self.reset_fusion()
        self._backend = _check_name(backend)
        self.record_fusion_weights = False
        self.fusion_weights: Optional[torch.Tensor] = None
        self._fold_key = None
        self._folded: Optional[FoldedWeights] = None
        # inference-time control of the fusion weights (afkern.control); None: plain fusion
        self.fusion_control = None

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
        """Initialise query/key/value as AdapterHub's ``BertFusion`` does."""
        fc = self.fusion_config
        for lin in (self.query, self.key, self.value):
            if lin is not None:
                _bert_normal_(lin.weight)
                if lin.bias is not None:
                    lin.bias.zero_()
        if self.value is not None and fc.value_initialized:
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self._temperature = _T_START if fc.temperature else 1.0

    # ------------------------------------------------------------------ state
    @property
    def n_adapters(self) -> int:
        return len(self.adapter_names)

    @property
    def temperature(self) -> float:
        """The current softmax temperature (annealed from 50 to 1 when ``temperature`` is on)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not value >= 1.0:
            raise ValueError(f"temperature must be >= 1, got {value!r}")
        self._temperature = float(value)

    def get_extra_state(self) -> torch.Tensor:
        # The temperature travels with state_dict (AdapterHub loses it on reload), as a small
        # float64 tensor [temperature, index of the active adapter or -1] so that every consumer of
        # state_dict (safetensors, weights_only loads, the TorchScript ONNX exporter) can hold it.
        active = -1 if self.active_adapter is None else self.adapter_names.index(self.active_adapter)
        return torch.tensor([self._temperature, float(active)], dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        temperature, active = (float(v) for v in torch.as_tensor(state).tolist())
        self._temperature = temperature
        if self.fusion_config is None and 0 <= int(active) < self.n_adapters:
            self.active_adapter = self.adapter_names[int(active)]

    @property
    def backend(self) -> str:
        return self._backend

    def set_backend(self, name: str) -> "FusedAdapterBlock":
        """Choose the backend; a named backend that cannot run on this block's device raises now."""
        name = _check_name(name)
        if name != "auto":
            resolve_backend(name, self.down_weight.device, self.spec())
        self._backend = name
        return self

    def resolved_backend(self, device=None) -> str:
        """The concrete backend the next forward on ``device`` will use."""
        return resolve_backend(self._backend, device or self.down_weight.device, self.spec())

    def spec(self) -> LayerSpec:
        fc = self.fusion_config
        ac = self.adapter_config
        common = dict(
            n_adapters=self.n_adapters, bottleneck=self.bottleneck, hidden=self.hidden_size,
            activation=canonical_activation(ac.non_linearity), original_ln_before=ac.original_ln_before,
            original_ln_after=ac.original_ln_after, residual_before_ln=ac.residual_before_ln,
            ln_eps=self.LayerNorm.eps,
        )
        if fc is None:
            return LayerSpec(fusion=False, active=self.adapter_names.index(self.active_adapter),
                             adapter_dropout=float(ac.dropout) if self.training else 0.0, **common)
        return LayerSpec(
            fusion=True, query=fc.query, key=fc.key, value=fc.value, query_before_ln=fc.query_before_ln,
            residual_before=fc.residual_before, score_dropout=self.score_dropout, **common,
        )

    def params(self) -> FusionParams:
        g = lambda m, a: None if m is None else getattr(m, a)  # noqa: E731
        return FusionParams(
            ln_weight=self.LayerNorm.weight, ln_bias=self.LayerNorm.bias,
            down_weight=self.down_weight, down_bias=self.down_bias, up_weight=self.up_weight, up_bias=self.up_bias,
            query_weight=g(getattr(self, "query", None), "weight"), query_bias=g(getattr(self, "query", None), "bias"),
            key_weight=g(getattr(self, "key", None), "weight"), key_bias=g(getattr(self, "key", None), "bias"),
            value_weight=g(getattr(self, "value", None), "weight"),
        )

    def _fusion_tensors(self) -> List[torch.Tensor]:
        out = [self.down_weight, self.down_bias, self.up_weight, self.up_bias]
        for name in ("query", "key", "value"):
            lin = getattr(self, name, None)
            if lin is not None:
                out += [p for p in lin.parameters()]
        return out

    def folded_weights(self) -> FoldedWeights:
        """Inference weights with the frozen products folded; recomputed whenever any source tensor
        changed through torch (optimizer steps, in-place ops, ``load_state_dict``, reassignment,
        dtype or device moves: each bumps the tensor's version counter or moves its storage).

        Writes through ``param.data`` bypass the version counter: call :meth:`invalidate_folded`
        after such a write (``train()`` / ``eval()`` also invalidate)."""
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in self._fusion_tensors())
        if key != self._fold_key or self._folded is None:
            self._folded = fold_weights(self.params(), self.spec())
            self._fold_key = key
        return self._folded

    def invalidate_folded(self) -> "FusedAdapterBlock":
        """Drop the folded inference weights; the next no-grad forward folds afresh."""
        self._fold_key = None
        self._folded = None
        return self

    def train(self, mode: bool = True) -> "FusedAdapterBlock":
        self.invalidate_folded()
        return super().train(mode)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> None:
        if not isinstance(hidden_states, torch.Tensor) or not isinstance(input_tensor, torch.Tensor):
            raise TypeError("FusedAdapterBlock.forward expects two tensors (hidden_states, input_tensor)")
        if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != self.in_features:
            raise ValueError(
                f"hidden_states must be [batch, seq, {self.in_features}] or [tokens, {self.in_features}], "
                f"got {tuple(hidden_states.shape)}"
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
        if hidden_states.dtype != input_tensor.dtype:
            raise TypeError(f"hidden_states ({hidden_states.dtype}) and input_tensor ({input_tensor.dtype}) dtypes differ")
        if not torch.is_autocast_enabled(hidden_states.device.type) and hidden_states.dtype != w.dtype:
            raise TypeError(
                f"inputs are {hidden_states.dtype} but the block's weights are {w.dtype}; cast the model "
                "(model.to(dtype)) or run under torch.autocast"
            )

    def score_dropout_scale(self, tokens: int, device) -> torch.Tensor:
        """The score-dropout scale [tokens, N] for one training forward: 0 for a dropped score,
        1/(1-p) for a kept one (nn.Dropout's rule). Drawn from torch's RNG, so ``torch.manual_seed``
        reproduces it; every backend, forward and backward, uses this one tensor."""
        keep = torch.rand(tokens, self.n_adapters, device=device) >= self.score_dropout
        return keep.to(torch.float32) / (1.0 - self.score_dropout)

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self._fusion_tensors())

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        self._check_inputs(hidden_states, input_tensor)
        h = self.dropout(self.dense(hidden_states))
        lead = h.shape[:-1]
        h2 = h.reshape(-1, self.hidden_size)
        x2 = input_tensor.reshape(-1, self.hidden_size)
        if torch.is_autocast_enabled(h2.device.type):
            x2 = x2.to(h2.dtype)
        spec = self.spec()
        name = resolve_backend(self._backend, h2.device, spec)
        score_scale = None
        if spec.fusion and self.training and self.score_dropout > 0:
            score_scale = self.score_dropout_scale(h2.shape[0], h2.device)
        folded = None
        # the fold cache keys on data pointers, which torch.compile cannot trace (fullgraph): compiled
        # graphs run the unfolded re-associated form and let the compiler plan the GEMMs
        if (spec.fusion and name != "reference" and not self._needs_grad()
                and not torch.compiler.is_compiling()):
            folded = self.folded_weights()
        ctrl = self.fusion_control if spec.fusion else None
        layer_fn = get_layer_fn(name) if ctrl is None else ctrl.layer_fn(name)
        out, probs = layer_fn(h2, x2, self.params(), spec, 1.0 / self._temperature, score_scale, folded)
        if spec.fusion and self.fusion_config.temperature:
            self._temperature = max(self._temperature - _T_START / 1000.0, 1.0)
        if self.record_fusion_weights and probs is not None:
            self.fusion_weights = probs.detach().reshape(*lead, spec.n_adapters)
        return out.reshape(*lead, self.hidden_size)

    def extra_repr(self) -> str:
        fc = "none" if self.fusion_config is None else ("dynamic" if self.fusion_config.value else "static")
        return (
            f"in_features={self.in_features}, hidden={self.hidden_size}, adapters={self.adapter_names}, "
            f"bottleneck={self.bottleneck}, activation={self.adapter_config.non_linearity}, fusion={fc}, "
            f"backend={self._backend}"
        )

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_output_module(cls, module: nn.Module, adapter_names: Sequence[str], adapter_config=None,
                           fusion_config=None, attention_probs_dropout_prob: float = 0.1, backend: str = "auto",
                           layer_idx: Optional[int] = None) -> "FusedAdapterBlock":
        """Build a block around an existing ``BertOutput``-like module (``dense``, ``LayerNorm``,
        ``dropout``), sharing its dense and LayerNorm parameters."""
        for attr in ("dense", "LayerNorm", "dropout"):
            if not hasattr(module, attr):
                raise TypeError(f"{type(module).__name__} has no {attr!r}; expected a BertOutput-like module")
        dense, ln = module.dense, module.LayerNorm
        w = dense.weight
        block = cls(
            hidden_size=dense.out_features, adapter_names=adapter_names, adapter_config=adapter_config,
            fusion_config=fusion_config, in_features=dense.in_features, layer_norm_eps=ln.eps,
            attention_probs_dropout_prob=attention_probs_dropout_prob, backend=backend, layer_idx=layer_idx,
            device=w.device, dtype=w.dtype,
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
