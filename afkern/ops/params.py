"""The parameter bundle and static description of one fused block, shared by all backends."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Dict, Optional, Union

import torch

__all__ = ["LayerSpec", "FusionParams"]


@dataclass(frozen=True)
class LayerSpec:
    """Everything static about one block that the math depends on.

    ``fusion`` False means a single active adapter (AdapterHub's plain ``set_active_adapters(name)``
    path, used for stage-1 training); then ``active`` selects it. ``layer_norm`` False is the
    norm-free site of the pre-LN families (AdapterHub hands ``layer_norm=None``): the adds of
    ``original_ln_before`` / ``original_ln_after`` happen without a LayerNorm
    (docs/DESIGN.md section 6).
    """

    n_adapters: int
    bottleneck: int
    hidden: int
    activation: str
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: Union[bool, str] = True
    ln_eps: float = 1e-12
    layer_norm: bool = True
    fusion: bool = True
    active: int = 0
    query: bool = True
    key: bool = True
    value: bool = True
    query_before_ln: bool = False
    residual_before: bool = False
    score_dropout: float = 0.0
    adapter_dropout: float = 0.0  # AdapterHub's adapter ``dropout`` on ``up``: only single-adapter blocks in training


@dataclass
class FusionParams:
    """Tensors of one block. Stacked adapter layout (both projections [N, r, d]):

    - ``down_weight[n]`` is adapter n's ``adapter_down.0.weight`` ([r, d], nn.Linear layout);
    - ``up_weight[n]`` is adapter n's ``adapter_up.weight`` transposed ([r, d]), so both GEMMs of
      the re-associated form read the one contiguous ``[N*r, d]`` view without a copy;
    - query/key/value in nn.Linear layout ([out, in]); value has no bias;
    - ``norm_module``: the site's own norm module when it is not a plain ``nn.LayerNorm`` (DeBERTa
      v1's, which normalises in float32 whatever the input): every backend then calls it on the
      sum instead of ``F.layer_norm(., ln_weight, ln_bias)``. None for ``nn.LayerNorm`` sites.
    """

    ln_weight: Optional[torch.Tensor]
    ln_bias: Optional[torch.Tensor]
    down_weight: torch.Tensor
    down_bias: torch.Tensor
    up_weight: torch.Tensor
    up_bias: torch.Tensor
    query_weight: Optional[torch.Tensor] = None
    query_bias: Optional[torch.Tensor] = None
    key_weight: Optional[torch.Tensor] = None
    key_bias: Optional[torch.Tensor] = None
    value_weight: Optional[torch.Tensor] = None
    norm_module: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def tensors(self) -> Dict[str, Optional[torch.Tensor]]:
        """The tensor fields by name (``norm_module`` left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "norm_module"}

    def replace(self, **tensors) -> "FusionParams":
        """A copy with some fields replaced (``norm_module`` kept)."""
        return FusionParams(**{**self.tensors(), "norm_module": self.norm_module, **tensors})

    def to(self, dtype: torch.dtype) -> "FusionParams":
        """Every tensor in ``dtype`` (differentiable casts: gradients still reach the originals)."""
        return self.replace(**{k: (v if v is None or v.dtype == dtype else v.to(dtype))
                               for k, v in self.tensors().items()})

    def select(self, index: torch.Tensor) -> "FusionParams":
        """The adapters ``index`` ([K] long) of the stacked ``[N, ...]`` tensors (differentiable)."""
        return self.replace(**{k: getattr(self, k).index_select(0, index) for k in _ADAPTER_FIELDS})


_ADAPTER_FIELDS = ("down_weight", "down_bias", "up_weight", "up_bias")
