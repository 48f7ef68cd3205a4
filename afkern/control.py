"""Adapter control at inference: force, zero or drop adapters of a trained fusion, no retraining.

AdapterHub users ask for this (``adapters`` issue #391: "how to use only some of the fused
adapters / set the fusion weights by hand"); ``adapters`` has no switch for it. In afkern:

- :func:`zero_adapters` sets ``p_n := 0`` for the named adapters and renormalises the rest
  (``p_m = exp(s_m) / sum_{k kept} exp(s_k)``), which is exactly the fusion with those adapters
  dropped;
- :func:`force_adapter` sets ``p_n := 1`` for one adapter (the others 0): the block computes
  ``LN(up_n Wv + residual + input)``, adapter n alone through the fusion's value map;
- :func:`force_fusion_weights` uses a fixed mixing vector ``p`` (the same for every token),
  ignoring the query/key scores: ``ctx = sum_n p_n up_n Wv + residual``;
- :func:`drop_adapters` / :func:`select_adapters` build blocks that hold only the kept adapters
  (the stacked ``[N, ...]`` parameters sliced), so the dropped ones cost nothing any more;
- :func:`clear_fusion_control` and the context manager :func:`fusion_control` undo it.

Mechanism: a :class:`FusionControl` set as ``block.fusion_control``. The block then runs the
torch fast path (any device) with a row op that adds a log-prior ``b`` ([N]; 0 keeps an adapter,
``-inf`` removes it) to the scores before the softmax, ``p = softmax(s / T + b)``, or that
returns the fixed ``p``. With the ``reference`` backend the naive per-adapter layer is run with
the same change. Everything else (dense, dropout, LayerNorm, residual, value map, recording of
the fusion weights) is the block's own.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import activation_fn
from .block import FusedAdapterBlock
from .ops.params import FusionParams, LayerSpec
from .ops.reference import block_prologue
from .patching import fused_blocks

__all__ = [
    "FusionControl",
    "zero_adapters",
    "force_adapter",
    "force_fusion_weights",
    "clear_fusion_control",
    "fusion_control",
    "select_adapters",
    "drop_adapters",
]

Names = Union[str, Sequence[str]]


class FusionControl:
    """What a block does with its fusion weights at inference.

    Exactly one of ``log_prior`` ([N], float32: added to the scores before the softmax; ``-inf``
    removes an adapter) and ``probs`` ([N], non-negative, summing to 1: the fixed mixing
    vector) is set. ``layer_fn(backend)`` returns a layer function with the backends' contract
    (``fn(h, input_tensor, P, spec, inv_temperature, score_scale, folded) -> (out, probs)``).
    """

    def __init__(self, log_prior: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None):
        if (log_prior is None) == (probs is None):
            raise ValueError("FusionControl takes exactly one of log_prior and probs")
        self.log_prior = None if log_prior is None else log_prior.detach().to(torch.float64)
        self.probs = None if probs is None else probs.detach().to(torch.float64)

    def __repr__(self) -> str:
        if self.probs is not None:
            return f"FusionControl(probs={self.probs.tolist()})"
        return f"FusionControl(log_prior={self.log_prior.tolist()})"

    def _vec(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """The control vector in the row op's accumulation dtype (float64 stays float64, else float32)."""
        v = self.probs if self.probs is not None else self.log_prior
        if v.shape != (n,):
            raise ValueError(f"fusion control for {v.shape[0]} adapters applied to a block with {n}")
        return v.to(device=like.device, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)

    # the row op of afkern.ops.rowop with the control applied (autograd derives the backward)
    def rowop(self, Z, A, sb, n_adapters, activation, inv_temperature=1.0, score_scale=None):
        T, W = Z.shape
        r = W // n_adapters
        G = activation_fn(activation)(Z).view(T, n_adapters, r)
        if self.probs is not None:
            p = self._vec(n_adapters, Z).expand(T, n_adapters)
        else:
            s = torch.einsum("tnr,tnr->tn", A.view(T, n_adapters, r), G)
            if sb is not None:
                s = s + sb
            if score_scale is not None:
                s = s * score_scale.to(s.dtype)
            v = self._vec(n_adapters, Z)
            p = torch.softmax(s.to(v.dtype) * inv_temperature + v, dim=-1)
        Y = (G * p.to(G.dtype).unsqueeze(-1)).view(T, W)
        return Y, p

    def reference_layer(self, h, input_tensor, P: FusionParams, spec: LayerSpec, inv_temperature=1.0,
                        score_scale=None, folded=None):
        """The naive per-adapter layer (``afkern.ops.reference``) with the control applied."""
        act = activation_fn(spec.activation)
        x, query, residual = block_prologue(h, input_tensor, P, spec)
        ups = [F.linear(act(F.linear(x, P.down_weight[n], P.down_bias[n])), P.up_weight[n].t(), P.up_bias[n])
               for n in range(spec.n_adapters)]
        value = torch.stack(ups, dim=-2)  # [T, N, d]
        if spec.residual_before:
            value = value + residual.unsqueeze(-2)
        v = F.linear(value, P.value_weight) if spec.value else value
        if self.probs is not None:
            probs = self._vec(spec.n_adapters, h).expand(h.shape[0], spec.n_adapters)
        else:
            q = F.linear(query, P.query_weight, P.query_bias) if spec.query else query
            k = F.linear(value, P.key_weight, P.key_bias) if spec.key else value
            scores = torch.matmul(q.unsqueeze(-2), k.transpose(-2, -1)).squeeze(-2)
            if score_scale is not None:
                scores = scores * score_scale.reshape(scores.shape).to(scores.dtype)
            probs = torch.softmax(scores * inv_temperature + self._vec(spec.n_adapters, h).to(scores.dtype), dim=-1)
        hidden = torch.matmul(probs.to(v.dtype).unsqueeze(-2), v).squeeze(-2)
        if not spec.residual_before:
            hidden = hidden + residual
        if spec.original_ln_after:
            hidden = F.layer_norm(hidden + input_tensor, (spec.hidden,), P.ln_weight, P.ln_bias, spec.ln_eps)
        return hidden, probs

    def layer_fn(self, backend: str):
        if backend == "reference":
            return self.reference_layer
        from .ops.fusion import fusion_layer_torch

        def fn(h, input_tensor, P, spec, inv_temperature=1.0, score_scale=None, folded=None):
            return fusion_layer_torch(h, input_tensor, P, spec, inv_temperature, score_scale, folded, rowop=self.rowop)

        return fn


# ---------------------------------------------------------------------------------- helpers
def _blocks(model_or_block: nn.Module) -> List[FusedAdapterBlock]:
    if isinstance(model_or_block, FusedAdapterBlock):
        blocks = [model_or_block]
    elif isinstance(model_or_block, nn.Module):
        blocks = [b for _, b in fused_blocks(model_or_block)]
    else:
        raise TypeError(f"expected a FusedAdapterBlock or a model holding them, got {type(model_or_block).__name__}")
    if not blocks:
        raise ValueError(f"{type(model_or_block).__name__} has no FusedAdapterBlock; patch or load it first")
    for b in blocks:
        if b.fusion_config is None:
            raise ValueError("adapter control applies to blocks with a fusion; this block has none (set_active_adapter)")
    return blocks


def _as_names(names: Names) -> List[str]:
    out = [names] if isinstance(names, str) else list(names)
    if any(not isinstance(n, str) for n in out):
        raise TypeError(f"adapter names must be strings, got {out!r}")
    return out


def _indices(block: FusedAdapterBlock, names: Iterable[str]) -> List[int]:
    unknown = [n for n in names if n not in block.adapter_names]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; the fusion has {block.adapter_names}")
    return [block.adapter_names.index(n) for n in names]


def _set(blocks: List[FusedAdapterBlock], controls: List[FusionControl]) -> None:
    for b, c in zip(blocks, controls):  # every control was built (and checked) first
        b.fusion_control = c


# ---------------------------------------------------------------------------------- public
def zero_adapters(model_or_block: nn.Module, names: Names) -> nn.Module:
    """Give the named adapters fusion weight 0 in every block and renormalise the others
    (the same output as the fusion with them dropped, see :func:`drop_adapters`)."""
    names = _as_names(names)
    blocks = _blocks(model_or_block)
    controls = []
    for b in blocks:
        idx = _indices(b, names)
        if len(set(idx)) >= b.n_adapters:
            raise ValueError(f"zeroing {names} would leave no adapter of {b.adapter_names}")
        prior = torch.zeros(b.n_adapters)
        prior[idx] = -math.inf
        controls.append(FusionControl(log_prior=prior))
    _set(blocks, controls)
    return model_or_block


def force_adapter(model_or_block: nn.Module, name: str) -> nn.Module:
    """Give adapter ``name`` fusion weight 1 (all others 0) in every block:
    the block computes ``LN(up_name Wv + residual + input)``."""
    if not isinstance(name, str):
        raise TypeError(f"force_adapter takes one adapter name, got {name!r}")
    blocks = _blocks(model_or_block)
    controls = []
    for b in blocks:
        (i,) = _indices(b, [name])
        p = torch.zeros(b.n_adapters)
        p[i] = 1.0
        controls.append(FusionControl(probs=p))
    _set(blocks, controls)
    return model_or_block


def force_fusion_weights(model_or_block: nn.Module, weights: Union[Mapping[str, float], Sequence[float], torch.Tensor]) -> nn.Module:
    """Use a fixed mixing vector in every block instead of the attention scores.

    ``weights``: {adapter name: weight} (missing adapters get 0) or a sequence/tensor [N] in the
    fusion's adapter order; non-negative, summing to 1.
    """
    blocks = _blocks(model_or_block)
    controls = []
    for b in blocks:
        if isinstance(weights, Mapping):
            idx = _indices(b, list(weights))
            p = torch.zeros(b.n_adapters, dtype=torch.float64)
            p[idx] = torch.tensor([float(weights[n]) for n in weights], dtype=torch.float64)
        else:
            p = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
            if p.numel() != b.n_adapters:
                raise ValueError(f"fusion weights must have one entry per adapter {b.adapter_names}, got {p.numel()}")
        if not torch.isfinite(p).all() or (p < 0).any() or abs(float(p.sum()) - 1.0) > 1e-4:
            raise ValueError(f"fusion weights must be finite, non-negative and sum to 1, got {p.tolist()}")
        controls.append(FusionControl(probs=p / p.sum()))
    _set(blocks, controls)
    return model_or_block


def clear_fusion_control(model_or_block: nn.Module) -> nn.Module:
    """Back to the trained fusion in every block."""
    for b in _blocks(model_or_block):
        b.fusion_control = None
    return model_or_block


@contextlib.contextmanager
def fusion_control(model_or_block: nn.Module, zero: Optional[Names] = None, force: Optional[str] = None,
                   weights=None) -> Iterator[nn.Module]:
    """Context manager: ``with afkern.fusion_control(model, zero=["b"]): model(**batch)``.

    Exactly one of ``zero``, ``force``, ``weights``; the blocks' previous controls are restored
    on exit.
    """
    if sum(x is not None for x in (zero, force, weights)) != 1:
        raise ValueError("fusion_control takes exactly one of zero=, force=, weights=")
    blocks = _blocks(model_or_block)
    saved = [b.fusion_control for b in blocks]
    try:
        if zero is not None:
            zero_adapters(model_or_block, zero)
        elif force is not None:
            force_adapter(model_or_block, force)
        else:
            force_fusion_weights(model_or_block, weights)
        yield model_or_block
    finally:
        for b, c in zip(blocks, saved):
            b.fusion_control = c


def select_adapters(block: FusedAdapterBlock, names: Sequence[str]) -> FusedAdapterBlock:
    """A new block holding only adapters ``names`` (in that order) of ``block`` and its fusion.

    The stacked ``[N, ...]`` adapter parameters are sliced (copied); the wrapped dense, LayerNorm
    and dropout modules are shared with ``block``; query/key/value are copied. With the trained
    fusion, its output equals ``block`` with the other adapters zeroed (:func:`zero_adapters`).
    """
    if not isinstance(block, FusedAdapterBlock):
        raise TypeError(f"select_adapters expects a FusedAdapterBlock, got {type(block).__name__}")
    names = _as_names(names)
    if not names:
        raise ValueError("select_adapters needs at least one adapter to keep")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate adapter names in {names}")
    idx = _indices(block, names)
    w = block.down_weight
    new = FusedAdapterBlock(
        hidden_size=block.hidden_size, adapter_names=names, adapter_config=block.adapter_config,
        fusion_config=block.fusion_config if block.fusion_config is not None else False,
        in_features=block.in_features, layer_norm_eps=block.LayerNorm.eps, backend=block.backend,
        layer_idx=block.layer_idx, device=w.device, dtype=w.dtype,
    )
    new.dense, new.LayerNorm, new.dropout = block.dense, block.LayerNorm, block.dropout
    ix = torch.tensor(idx, device=w.device)
    with torch.no_grad():
        for pname in ("down_weight", "down_bias", "up_weight", "up_bias"):
            src = getattr(block, pname)
            getattr(new, pname).copy_(src.index_select(0, ix))
            getattr(new, pname).requires_grad_(src.requires_grad)
    for lin in ("query", "key", "value"):
        if getattr(block, lin, None) is not None:
            setattr(new, lin, copy.deepcopy(getattr(block, lin)))
    new.score_dropout = block.score_dropout
    new._temperature = block._temperature
    if block.fusion_config is None:
        new.active_adapter = block.active_adapter if block.active_adapter in names else names[0]
    new.record_fusion_weights = block.record_fusion_weights
    new.train(block.training)
    return new


def drop_adapters(model: nn.Module, names: Names) -> nn.Module:
    """Remove the named adapters from every fused block of ``model``, in place, without
    retraining (the output equals :func:`zero_adapters` of them). Returns ``model``."""
    names = _as_names(names)
    if isinstance(model, FusedAdapterBlock):
        raise TypeError("drop_adapters works on a model; for a single block use select_adapters(block, kept_names)")
    found = list(fused_blocks(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no FusedAdapterBlock")
    plan = []
    for qual, b in found:
        _indices(b, names)
        keep = [n for n in b.adapter_names if n not in names]
        if not keep:
            raise ValueError(f"dropping {names} would leave no adapter of {b.adapter_names}")
        parent_name, _, attr = qual.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        plan.append((parent, attr, select_adapters(b, keep)))
    for parent, attr, nb in plan:  # nothing changes until every block was built
        setattr(parent, attr, nb)
    return model
