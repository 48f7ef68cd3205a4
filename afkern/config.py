"""Adapter and fusion settings with AdapterHub's field names and defaults.

``AdapterConfig`` mirrors ``adapters.BnConfig`` / ``SeqBnConfig`` (the Pfeiffer adapter is the
default); ``FusionConfig`` mirrors ``adapters.AdapterFusionConfig`` with ``dynamic()`` the default.
Both round-trip through the ``config`` dict AdapterHub writes into ``adapter_config.json`` /
``adapter_fusion_config.json``. Settings afkern cannot compute exactly are refused with a
ValueError that names the field, at construction, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from .ops.activations import canonical_activation

__all__ = ["AdapterConfig", "FusionConfig"]


@dataclass
class AdapterConfig:
    """Bottleneck adapter settings (AdapterHub ``SeqBnConfig`` names and defaults).

    ``reduction_factor`` gives the bottleneck ``r = hidden // reduction_factor`` (at least 1), as
    AdapterHub computes it; a mapping ``{"<layer>": rf, "default": rf}`` sets it per layer.
    ``mh_adapter`` places an adapter after attention (``BertSelfOutput``), ``output_adapter``
    after the feed-forward block (``BertOutput``); Houlsby uses both. ``cross_adapter`` places one
    after the decoder's cross-attention (encoder-decoder families: BART, T5).
    """

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: Union[float, Mapping] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: Optional[int] = None
    is_parallel: bool = False
    scaling: Union[float, str] = 1.0
    use_gating: bool = False
    residual_before_ln: Union[bool, str] = True
    adapter_residual_before_ln: bool = False
    inv_adapter: Optional[str] = None
    inv_adapter_reduction_factor: Optional[float] = None
    cross_adapter: bool = False
    leave_out: List[int] = field(default_factory=list)
    dropout: float = 0.0
    phm_layer: bool = False
    stochastic_depth: float = 0.0

    def __post_init__(self):
        self.non_linearity = self.non_linearity.lower() if isinstance(self.non_linearity, str) else self.non_linearity
        canonical_activation(self.non_linearity)  # validates the name
        unsupported = {
            "ln_before": (self.ln_before, False),
            "ln_after": (self.ln_after, False),
            "is_parallel": (self.is_parallel, False),
            "use_gating": (self.use_gating, False),
            "inv_adapter": (self.inv_adapter, None),
            "phm_layer": (self.phm_layer, False),
            "stochastic_depth": (self.stochastic_depth, 0.0),
        }
        for name, (value, default) in unsupported.items():
            if value != default:
                raise ValueError(
                    f"AdapterConfig.{name}={value!r} is not supported by afkern (expected {default!r}); "
                    "afkern fuses sequential bottleneck adapters (Pfeiffer / Houlsby placements)"
                )
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise ValueError(f"AdapterConfig.scaling must be a float (got {self.scaling!r}); 'learned'/'channel' are not supported")
        self.scaling = float(self.scaling)
        if self.scaling == 0.0:
            raise ValueError("AdapterConfig.scaling must be non-zero (a zero scaling switches the adapter off)")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"AdapterConfig.residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ValueError("AdapterConfig.residual_before_ln='post_add' needs original_ln_before=True")
        if not (self.mh_adapter or self.output_adapter or self.cross_adapter):
            raise ValueError("AdapterConfig needs mh_adapter, output_adapter or cross_adapter set")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_weights not in ("bert", "mam_adapter", "houlsby"):
            raise ValueError(f"AdapterConfig.init_weights must be 'bert', 'mam_adapter' or 'houlsby', got {self.init_weights!r}")

    @classmethod
    def pfeiffer(cls, **kwargs) -> "AdapterConfig":
        """Pfeiffer et al. (2021): one adapter after the feed-forward block (AdapterHub ``seq_bn``)."""
        return cls(**kwargs)

    @classmethod
    def houlsby(cls, **kwargs) -> "AdapterConfig":
        """Houlsby et al. (2019): adapters after attention and feed-forward (AdapterHub ``double_seq_bn``)."""
        base = dict(mh_adapter=True, output_adapter=True, original_ln_before=False, non_linearity="swish")
        base.update(kwargs)
        return cls(**base)

    def bottleneck(self, hidden_size: int, layer: Optional[int] = None) -> int:
        """Bottleneck width r for a layer, as AdapterHub computes ``down_sample``."""
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            if layer is not None and str(layer) in rf:
                rf = rf[str(layer)]
            elif "default" in rf:
                rf = rf["default"]
            else:
                raise ValueError(f"reduction_factor mapping {dict(rf)} has no entry for layer {layer} and no 'default'")
        if rf <= 0:
            raise ValueError(f"reduction_factor must be > 0, got {rf}")
        return max(1, int(hidden_size // rf))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdapterConfig":
        """From an AdapterHub ``adapter_config.json`` ``config`` dict (unknown keys at defaults are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        ignorable = {
            "architecture": "bottleneck", "factorized_phm_W": None, "factorized_phm_rule": None,
            "hypercomplex_nonlinearity": None, "learn_phm": None, "phm_bias": None, "phm_c_init": None,
            "phm_dim": None, "phm_init_range": None, "phm_rank": None, "shared_W_phm": None, "shared_phm_rule": None,
        }
        kwargs = {}
        for k, v in d.items():
            if k in names:
                kwargs[k] = v
            elif k in ignorable:
                if k == "architecture" and v not in (None, "bottleneck"):
                    raise ValueError(f"adapter architecture {v!r} is not a bottleneck adapter; afkern fuses bottleneck adapters")
            else:
                raise ValueError(f"unknown adapter config field {k!r}")
        return cls(**kwargs)

    def to_adapterhub_dict(self) -> Dict[str, Any]:
        """The ``config`` dict AdapterHub's ``SeqBnConfig`` writes (all BnConfig fields)."""
        d = self.to_dict()
        d.update(
            factorized_phm_W=True, factorized_phm_rule=False, hypercomplex_nonlinearity="glorot-uniform",
            learn_phm=True, phm_bias=True, phm_c_init="normal", phm_dim=4, phm_init_range=0.0001,
            phm_rank=1, shared_W_phm=False, shared_phm_rule=True,
        )
        return d


@dataclass
class FusionConfig:
    """AdapterFusion settings (AdapterHub ``AdapterFusionConfig`` names; defaults of ``dynamic``).

    ``dropout_prob`` None means AdapterHub's rule: the model's ``attention_probs_dropout_prob``.
    ``temperature`` True starts the softmax temperature at 50 and lowers it by 50/1000 on every
    forward (train and eval, as AdapterHub does) down to 1.
    """

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: Union[bool, str] = True
    dropout_prob: Optional[float] = None

    def __post_init__(self):
        if self.dropout_prob is not None and not 0.0 <= float(self.dropout_prob) < 1.0:
            raise ValueError(f"FusionConfig.dropout_prob must be None or in [0, 1), got {self.dropout_prob!r}")

    @classmethod
    def dynamic(cls, **kwargs) -> "FusionConfig":
        """Fusion with a value matrix initialised near identity and regularised (the paper's)."""
        return cls(**kwargs)

    @classmethod
    def static(cls, **kwargs) -> "FusionConfig":
        """Fusion without a value matrix (AdapterHub ``StaticAdapterFusionConfig``)."""
        base = dict(value=False, regularization=False, value_initialized=False)
        base.update(kwargs)
        return cls(**base)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FusionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown fusion config fields {sorted(unknown)}; expected a subset of {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def load(cls, config: Union[str, Mapping, "FusionConfig", None]) -> "FusionConfig":
        """Accept a FusionConfig, an AdapterHub dict, or the names 'dynamic' / 'static'."""
        if config is None:
            return cls.dynamic()
        if isinstance(config, FusionConfig):
            return config
        if isinstance(config, str):
            if config == "dynamic":
                return cls.dynamic()
            if config == "static":
                return cls.static()
            raise ValueError(f"unknown fusion config name {config!r}; expected 'dynamic' or 'static'")
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        if hasattr(config, "to_dict"):  # an adapters.AdapterFusionConfig
            return cls.from_dict(config.to_dict())
        raise TypeError(f"fusion_config must be a FusionConfig, dict or name, got {type(config).__name__}")


def load_adapter_config(config) -> AdapterConfig:
    """Accept an AdapterConfig, an AdapterHub config object or dict, or 'pfeiffer'/'seq_bn'/'houlsby'/'double_seq_bn'."""
    if config is None:
        return AdapterConfig.pfeiffer()
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, str):
        table = {"pfeiffer": AdapterConfig.pfeiffer, "seq_bn": AdapterConfig.pfeiffer,
                 "houlsby": AdapterConfig.houlsby, "double_seq_bn": AdapterConfig.houlsby}
        if config not in table:
            raise ValueError(f"unknown adapter config name {config!r}; expected one of {sorted(table)}")
        return table[config]()
    if isinstance(config, Mapping):
        return AdapterConfig.from_dict(config)
    if hasattr(config, "to_dict"):
        return AdapterConfig.from_dict(config.to_dict())
    raise TypeError(f"adapter_config must be an AdapterConfig, dict or name, got {type(config).__name__}")
