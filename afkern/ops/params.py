"""The parameter bundle and static description of one fused block, shared by all backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["LayerSpec", "FusionParams"]


@dataclass(frozen=True)
class LayerSpec:
    """Everything static about one block that the math depends on.

    ``fusion`` False means a single active adapter (AdapterHub's plain ``set_active_adapters(name)``
    path, used for stage-1 training); then ``active`` selects it.
    """

    n_adapters: int
    bottleneck: int
    hidden: int
    activation: str
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: Union[bool, str] = True
    ln_eps: float = 1e-12
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
    - query/key/value in nn.Linear layout ([out, in]); value has no bias.
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
