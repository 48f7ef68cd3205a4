"""Folded inference weights: every frozen product of the re-associated layer, computed once.

With q' = (query Wq^T + bq) Wk = query M + c (docs/DESIGN.md section 2), the layer's three
query-side and adapter-side GEMMs become one input map and one output map:

    [Z | A | sb] = x @ [Wd_cat^T | M Wu_cat^T | M bu^T] + [bd | c Wu_cat^T | c bu^T]
    ctx          = [Y | p] @ ([Wu_cat ; bu] Wv^T) + residual-term

(``query_before_ln``: the query input is h, not x, so Z and [A | sb] are two GEMMs.) Folding is
done in float64 and cast to the weights' dtype. The ``bk`` term of the score is the same for every
adapter and cancels in the softmax, so it is dropped here; under score dropout it no longer cancels,
and the layer then runs unfolded (``afkern.ops.layer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .params import FusionParams, LayerSpec

__all__ = ["FoldedWeights", "fold_weights", "query_pullback"]


@dataclass
class FoldedWeights:
    """Inference weights with every frozen product precomputed.

    ``w_in`` [d, 2 N r + N] maps x to [Z | A | sb] (``w_q`` None), or ``w_in`` [d, N r] maps x to
    Z alone and ``w_q`` [d, N r + N] maps the query input (h under ``query_before_ln``) to [A | sb];
    ``w_out`` [N r + N, d] maps [Y | p] to the value-mapped mix; ``w_res`` [d, d] or None maps
    the residual when ``residual_before`` puts it under the value map.
    """

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_q: Optional[torch.Tensor]
    b_q: Optional[torch.Tensor]
    w_out: torch.Tensor
    w_res: Optional[torch.Tensor]
    #: the layer's views of these weights (``afkern.ops.layer``), made once per fold
    core: Optional[Any] = field(default=None, repr=False, compare=False)


def query_pullback(P: FusionParams, spec: LayerSpec):
    """(M, c) with q' = query @ M + c; either may be None (identity, zero)."""
    M, c = None, None
    if spec.query:
        M = P.query_weight.t()
        c = P.query_bias
    if spec.key:
        M = P.key_weight if M is None else M @ P.key_weight
        c = None if c is None else c @ P.key_weight
    return M, c


@torch.no_grad()
def fold_weights(P: FusionParams, spec: LayerSpec) -> FoldedWeights:
    """Fold the frozen products for inference; computed in float64 then cast to the weight dtype."""
    dtype = P.down_weight.dtype
    N, r, d = P.down_weight.shape
    Q = P.to(torch.float64)
    Wd = Q.down_weight.reshape(N * r, d)
    Wu = Q.up_weight.reshape(N * r, d)
    M, c = query_pullback(Q, spec)
    # query side: q' @ [Wu_cat^T | bu^T]
    Wqs = torch.cat([Wu.t(), Q.up_bias.t()], dim=1)  # [d, N*r + N]
    w_q = Wqs if M is None else M @ Wqs
    b_q = torch.zeros(w_q.shape[1], dtype=torch.float64, device=w_q.device) if c is None else c @ Wqs
    # value side: [Y | p] @ [Wu_cat ; bu] (@ Wv^T)
    w_out = torch.cat([Wu, Q.up_bias], dim=0)  # [N*r + N, d]
    w_res = None
    if spec.value:
        w_out = w_out @ Q.value_weight.t()
        if spec.residual_before:
            w_res = Q.value_weight.t().contiguous()
    if spec.query_before_ln:
        w_in, b_in = Wd.t(), Q.down_bias.reshape(N * r)
        qw, qb = w_q, b_q
    else:
        w_in = torch.cat([Wd.t(), w_q], dim=1)
        b_in = torch.cat([Q.down_bias.reshape(N * r), b_q])
        qw = qb = None
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    return FoldedWeights(cast(w_in), cast(b_in), cast(qw), cast(qb), cast(w_out), cast(w_res))
