"""Model-level walks and the one swap of fused blocks into a model.

Every change that puts new blocks into a model (patching, loading AdapterHub directories, pruning,
dropping adapters) builds every new block first and then calls :func:`install` once, so an error
while building leaves the model untouched.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .backends import check_name, resolve_backend
from .block import FusedAdapterBlock

__all__ = ["structure_kwargs", "fused_blocks", "blocks_of", "install", "replace_blocks", "set_backend", "fusion_regularization_loss",
           "set_active_adapter"]


def structure_kwargs(cls, base: Optional[nn.Module] = None, has_pooler: Optional[bool] = None) -> dict:
    """Constructor keywords that make a new ``cls`` model the same shape as ``base`` (or as a record
    that says ``has_pooler``): the pooler that RoBERTa-style heads, and users, leave out
    (``add_pooling_layer``), where ``cls`` takes it."""
    import inspect

    if has_pooler is None and base is not None and hasattr(base, "pooler"):
        has_pooler = base.pooler is not None
    if has_pooler is None or "add_pooling_layer" not in inspect.signature(cls.__init__).parameters:
        return {}
    return {"add_pooling_layer": bool(has_pooler)}


def fused_blocks(model: nn.Module) -> Iterator[Tuple[str, FusedAdapterBlock]]:
    """(qualified name, block) for every FusedAdapterBlock in ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, FusedAdapterBlock):
            yield name, m


def blocks_of(model_or_block: nn.Module, what: str = "this") -> List[FusedAdapterBlock]:
    """The block itself, or every block of a model; a ValueError saying how to get some if none."""
    if isinstance(model_or_block, FusedAdapterBlock):
        return [model_or_block]
    if not isinstance(model_or_block, nn.Module):
        raise TypeError(f"expected a FusedAdapterBlock or a model holding them, got {type(model_or_block).__name__}")
    blocks = [b for _, b in fused_blocks(model_or_block)]
    if not blocks:
        raise ValueError(f"{type(model_or_block).__name__} has no FusedAdapterBlock for {what}; patch it first "
                         "(afkern.patch_model) or load adapters (afkern.load_adapterhub)")
    return blocks


def install(plan: Sequence[Tuple[nn.Module, str, nn.Module]]) -> None:
    """Set ``parent.<attr> = module`` for every entry; call it once every module was built."""
    for parent, attr, module in plan:
        setattr(parent, attr, module)


def _parent(model: nn.Module, qualname: str) -> Tuple[nn.Module, str]:
    parent_name, _, attr = qualname.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_blocks(model: nn.Module, new: Dict[str, FusedAdapterBlock]) -> nn.Module:
    """Replace the fused blocks named in ``new`` ({qualified name: block}, built beforehand);
    every name is checked before anything is swapped. Returns ``model``."""
    have = dict(fused_blocks(model))
    unknown = sorted(set(new) - set(have))
    if unknown:
        raise ValueError(f"no fused blocks named {unknown}; the model has {sorted(have)}")
    bad = [k for k, b in new.items() if not isinstance(b, FusedAdapterBlock)]
    if bad:
        raise TypeError(f"replacements for {bad} are not FusedAdapterBlocks")
    install([(*_parent(model, k), b) for k, b in new.items()])
    return model


def set_backend(model_or_block: nn.Module, name: str) -> nn.Module:
    """Set the backend of a block or of every block in a model; raises, changing nothing, if
    ``name`` cannot run for one of them."""
    check_name(name)
    blocks = blocks_of(model_or_block, "set_backend")
    if name != "auto":  # validate every block first, then set
        for b in blocks:
            resolve_backend(name, b.down_weight.device, b.spec())
    for b in blocks:
        b.set_backend(name)
    return model_or_block


def fusion_regularization_loss(model: nn.Module, fusion: Optional[Union[str, Sequence[str]]] = None) -> torch.Tensor:
    """AdapterHub's value regularisation: ``sum of 0.01 * ||I - Wv||_F^2`` over every fusion (or the
    named ones) of every block whose value matrix is trainable (``get_fusion_regularization_loss``);
    a zero scalar if none."""
    names = None if fusion is None else ({fusion} if isinstance(fusion, str) else set(fusion))
    total = None
    for _, b in fused_blocks(model):
        for k, f in b.fusions.items():
            if names is not None and k not in names:
                continue
            term = f.regularization_loss()
            if term is not None:
                total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return total


def set_active_adapter(model: nn.Module, name: str) -> nn.Module:
    """Run adapter ``name`` alone, without fusion, in every block (AdapterHub's
    ``set_active_adapters(name)``); checks every block first."""
    blocks = blocks_of(model, "set_active_adapter")
    for b in blocks:
        if name not in b.adapter_names:
            raise ValueError(f"unknown adapter {name!r}; the model has {b.adapter_names}")
    for b in blocks:
        b.set_active_adapter(name)
    return model
