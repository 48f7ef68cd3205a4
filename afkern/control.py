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

Mechanism: a :class:`afkern.fusion.FusionControl` set as ``block.fusion_control``. It becomes two
inputs of the row op on every backend (docs/DESIGN.md section 5): a log-prior ``b`` ([N]; 0 keeps
an adapter, ``-inf`` removes it) added to the tempered scores, ``p = softmax(s / T + b)``, and for
fixed weights ``1/T = 0`` with ``b = log p``. Everything else (dense, dropout, LayerNorm,
residual, value map, recording of the fusion weights) is the block's own.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .block import FusedAdapterBlock, check_adapter_names
from .fusion import AdapterFusion, FusionControl
from .model import blocks_of, fused_blocks, replace_blocks

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


# ---------------------------------------------------------------------------------- helpers
def _blocks(model_or_block: nn.Module) -> List[FusedAdapterBlock]:
    blocks = blocks_of(model_or_block, "adapter control")
    for b in blocks:
        if b.fusion_config is None:
            raise ValueError("adapter control applies to blocks with a fusion; this block has none (set_active_adapter)")
    return blocks


def _fusions(model_or_block: nn.Module, fusion: Optional[str]) -> List[AdapterFusion]:
    """The fusion a control acts on in every block: the named one, or the active one."""
    if fusion is None:
        return [b.fusion for b in _blocks(model_or_block)]
    blocks = blocks_of(model_or_block, "adapter control")
    for b in blocks:
        if fusion not in b.fusions:
            raise ValueError(f"unknown fusion {fusion!r}; the model has fusions {list(b.fusions)}")
    return [b.fusions[fusion] for b in blocks]


def _as_names(names: Names) -> List[str]:
    out = [names] if isinstance(names, str) else list(names)
    if any(not isinstance(n, str) for n in out):
        raise TypeError(f"adapter names must be strings, got {out!r}")
    return out


def _indices(fusion: AdapterFusion, names: Iterable[str]) -> List[int]:
    """Positions of ``names`` among the fusion's adapters."""
    have = fusion.adapter_names
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; the fusion has {have}")
    return [have.index(n) for n in names]


def _set(fusions: List[AdapterFusion], controls: List[FusionControl]) -> None:
    for f, c in zip(fusions, controls):  # every control was built (and checked) first
        f.control = c


# ---------------------------------------------------------------------------------- public
def zero_adapters(model_or_block: nn.Module, names: Names, fusion: Optional[str] = None) -> nn.Module:
    """Give the named adapters fusion weight 0 in every block and renormalise the others
    (the same output as the fusion with them dropped, see :func:`drop_adapters`). ``fusion``: the
    fusion to control (default: the active one); each fusion keeps its own control, also when
    routed (``afkern.route``)."""
    names = _as_names(names)
    blocks = _fusions(model_or_block, fusion)
    controls = []
    for b in blocks:
        idx = _indices(b, names)
        n = len(b.adapter_names)
        if len(set(idx)) >= n:
            raise ValueError(f"zeroing {names} would leave no adapter of {b.adapter_names}")
        prior = torch.zeros(n)
        prior[idx] = -math.inf
        controls.append(FusionControl(log_prior=prior))
    _set(blocks, controls)
    return model_or_block


def force_adapter(model_or_block: nn.Module, name: str, fusion: Optional[str] = None) -> nn.Module:
    """Give adapter ``name`` fusion weight 1 (all others 0) in every block:
    the block computes ``LN(up_name Wv + residual + input)``. ``fusion``: as in :func:`zero_adapters`."""
    if not isinstance(name, str):
        raise TypeError(f"force_adapter takes one adapter name, got {name!r}")
    blocks = _fusions(model_or_block, fusion)
    controls = []
    for b in blocks:
        (i,) = _indices(b, [name])
        p = torch.zeros(len(b.adapter_names))
        p[i] = 1.0
        controls.append(FusionControl(probs=p))
    _set(blocks, controls)
    return model_or_block


def force_fusion_weights(model_or_block: nn.Module, weights: Union[Mapping[str, float], Sequence[float], torch.Tensor],
                         fusion: Optional[str] = None) -> nn.Module:
    """Use a fixed mixing vector in every block instead of the attention scores.

    ``weights``: {adapter name: weight} (missing adapters get 0) or a sequence/tensor [N] in the
    fusion's adapter order; non-negative, summing to 1. ``fusion``: as in :func:`zero_adapters`.
    """
    blocks = _fusions(model_or_block, fusion)
    controls = []
    for b in blocks:
        have = b.adapter_names
        if isinstance(weights, Mapping):
            idx = _indices(b, list(weights))
            p = torch.zeros(len(have), dtype=torch.float64)
            p[idx] = torch.tensor([float(weights[n]) for n in weights], dtype=torch.float64)
        else:
            p = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
            if p.numel() != len(have):
                raise ValueError(f"fusion weights must have one entry per adapter {have}, got {p.numel()}")
        if not torch.isfinite(p).all() or (p < 0).any() or abs(float(p.sum()) - 1.0) > 1e-4:
            raise ValueError(f"fusion weights must be finite, non-negative and sum to 1, got {p.tolist()}")
        controls.append(FusionControl(probs=p / p.sum()))
    _set(blocks, controls)
    return model_or_block


def clear_fusion_control(model_or_block: nn.Module, fusion: Optional[str] = None) -> nn.Module:
    """Back to the trained fusion (the active one, or ``fusion``) in every block."""
    for f in _fusions(model_or_block, fusion):
        f.control = None
    return model_or_block


@contextlib.contextmanager
def fusion_control(model_or_block: nn.Module, zero: Optional[Names] = None, force: Optional[str] = None,
                   weights=None, fusion: Optional[str] = None) -> Iterator[nn.Module]:
    """Context manager: ``with afkern.fusion_control(model, zero=["b"]): model(**batch)``.

    Exactly one of ``zero``, ``force``, ``weights``, for the active fusion or ``fusion``; the
    fusions' previous controls are restored on exit.
    """
    if sum(x is not None for x in (zero, force, weights)) != 1:
        raise ValueError("fusion_control takes exactly one of zero=, force=, weights=")
    fusions = _fusions(model_or_block, fusion)
    saved = [f.control for f in fusions]
    try:
        if zero is not None:
            zero_adapters(model_or_block, zero, fusion)
        elif force is not None:
            force_adapter(model_or_block, force, fusion)
        else:
            force_fusion_weights(model_or_block, weights, fusion)
        yield model_or_block
    finally:
        for f, c in zip(fusions, saved):
            f.control = c


def select_adapters(block: FusedAdapterBlock, names: Sequence[str]) -> FusedAdapterBlock:
    """A new block holding only adapters ``names`` (in that order) of ``block`` and its fusions:
    :meth:`FusedAdapterBlock.select_adapters` (with the trained fusion, its output equals ``block``
    with the other adapters zeroed, :func:`zero_adapters`)."""
    if not isinstance(block, FusedAdapterBlock):
        raise TypeError(f"select_adapters expects a FusedAdapterBlock, got {type(block).__name__}")
    return block.select_adapters(names)


def drop_adapters(model: nn.Module, names: Names) -> nn.Module:
    """Remove the named adapters from every fused block of ``model``, in place, without
    retraining (the output equals :func:`zero_adapters` of them). Every new block is built before
    any is swapped in. Returns ``model``."""
    names = check_adapter_names(names)
    if isinstance(model, FusedAdapterBlock):
        raise TypeError("drop_adapters works on a model; for a single block use select_adapters(block, kept_names)")
    found = list(fused_blocks(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no FusedAdapterBlock")
    new = {}
    for qual, b in found:
        unknown = [n for n in names if n not in b.adapter_names]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; {qual} has {b.adapter_names}")
        keep = [n for n in b.adapter_names if n not in names]
        if not keep:
            raise ValueError(f"dropping {names} would leave no adapter of {b.adapter_names}")
        new[qual] = b.select_adapters(keep)
    return replace_blocks(model, new)
