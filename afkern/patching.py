"""Swapping ``FusedAdapterBlock``s into HF BERT-family models, and converting AdapterHub models.

Where the blocks go: every encoder layer of a BERT-family model has an attention output module
(``layer.attention.output``: BertSelfOutput, RobertaSelfOutput, ...) and a feed-forward output
module (``layer.output``: BertOutput, ...), both ``dense -> dropout -> LayerNorm(. + input)``.
``output_adapter`` puts a block at the latter, ``mh_adapter`` at the former (Houlsby: both).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn

from .backends import _check_name, resolve_backend
from .block import FusedAdapterBlock
from .config import FusionConfig, load_adapter_config

__all__ = ["patch_bert", "fused_blocks", "set_backend", "fusion_regularization_loss", "encoder_layers", "output_sites"]


def encoder_layers(model: nn.Module) -> List[nn.Module]:
    """The encoder layers of a BERT-family model (``<base>.encoder.layer``)."""
    base = getattr(model, "base_model", model)
    enc = getattr(base, "encoder", None)
    layers = getattr(enc, "layer", None) if enc is not None else None
    if layers is None:
        raise TypeError(
            f"{type(model).__name__} is not a BERT-family model: expected <model>.encoder.layer "
            "(BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa-v2 ...)"
        )
    return list(layers)


def _is_output_module(m) -> bool:
    # a custom LayerNorm class (DeBERTa v1's DebertaLayerNorm) may compute something else: refuse it
    return (all(hasattr(m, a) for a in ("dense", "LayerNorm", "dropout")) and isinstance(getattr(m, "dense"), nn.Linear)
            and isinstance(getattr(m, "LayerNorm"), nn.LayerNorm))


def output_sites(layer: nn.Module) -> Dict[str, Tuple[nn.Module, str]]:
    """{"output": (parent, attr), "attention": (parent, attr)} for one encoder layer."""
    sites = {}
    if _is_output_module(getattr(layer, "output", None)) or isinstance(getattr(layer, "output", None), FusedAdapterBlock):
        sites["output"] = (layer, "output")
    att = getattr(layer, "attention", None)
    if att is not None and (_is_output_module(getattr(att, "output", None)) or isinstance(getattr(att, "output", None), FusedAdapterBlock)):
        sites["attention"] = (att, "output")
    return sites


def fused_blocks(model: nn.Module) -> Iterator[Tuple[str, FusedAdapterBlock]]:
    """(qualified name, block) for every FusedAdapterBlock in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, FusedAdapterBlock):
            yield name, m


def _model_dropout(model) -> float:
    cfg = getattr(model, "config", None)
    return float(getattr(cfg, "attention_probs_dropout_prob", 0.0) or 0.0)


def patch_bert(
    model: nn.Module,
    adapter_names: Sequence[str],
    adapter_config=None,
    fusion_config=None,
    backend: str = "auto",
) -> nn.Module:
    """Swap fused blocks into a loaded transformers BERT-family model, in place, and return it.

    New adapters and the fusion are initialised as AdapterHub initialises them; the model's own
    dense and LayerNorm weights are kept (shared). ``fusion_config=False`` adds the adapters
    without a fusion (one active adapter, ``set_active_adapter``), for single-task training.
    The base model's parameters are left as they were (freeze them yourself, or use
    :func:`afkern.train`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_bert expects a torch.nn.Module (a transformers model), got {type(model).__name__}")
    names = list(adapter_names) if adapter_names is not None else []
    if not names:
        raise ValueError("patch_bert needs at least one adapter name, got none")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate adapter names {dup} in {names}")
    _check_name(backend)
    acfg = load_adapter_config(adapter_config)
    fcfg = False if fusion_config is False else FusionConfig.load(fusion_config)
    layers = encoder_layers(model)
    if any(isinstance(m, FusedAdapterBlock) for m in model.modules()):
        raise ValueError("model already has FusedAdapterBlocks; patch a fresh model (or use load_adapterhub)")
    plan = []
    for i, layer in enumerate(layers):
        if i in acfg.leave_out:
            continue
        sites = output_sites(layer)
        for loc, flag in (("attention", acfg.mh_adapter), ("output", acfg.output_adapter)):
            if not flag:
                continue
            if loc not in sites:
                raise TypeError(
                    f"layer {i} ({type(layer).__name__}) has no {loc} output module with dense (nn.Linear), "
                    "LayerNorm (nn.LayerNorm) and dropout, as BERT's BertOutput / BertSelfOutput have"
                )
            plan.append((i, loc, sites[loc]))
    p_drop = _model_dropout(model)
    new = []
    for i, loc, (parent, attr) in plan:
        block = FusedAdapterBlock.from_output_module(
            getattr(parent, attr), names, adapter_config=acfg, fusion_config=fcfg,
            attention_probs_dropout_prob=p_drop, backend=backend, layer_idx=i,
        )
        block.train(model.training)
        new.append((parent, attr, block))
    for parent, attr, block in new:  # nothing is changed until every block was built
        setattr(parent, attr, block)
    return model


def set_backend(model_or_block: nn.Module, name: str) -> nn.Module:
    """Set the backend of a block or of every block in a model; raises if ``name`` cannot run there."""
    _check_name(name)
    blocks = [model_or_block] if isinstance(model_or_block, FusedAdapterBlock) else [b for _, b in fused_blocks(model_or_block)]
    if not blocks:
        raise ValueError(f"{type(model_or_block).__name__} has no FusedAdapterBlock; patch it first (afkern.patch_bert)")
    if name != "auto":  # validate every block first, then set
        for b in blocks:
            resolve_backend(name, b.down_weight.device, b.spec())
    for b in blocks:
        b._backend = name
    return model_or_block


def fusion_regularization_loss(model: nn.Module) -> torch.Tensor:
    """AdapterHub's value regularisation: ``sum over blocks of 0.01 * ||I - Wv||_F^2`` for every
    block whose value matrix is trainable (as ``get_fusion_regularization_loss``); 0 if none."""
    total = None
    for _, b in fused_blocks(model):
        v = getattr(b, "value", None)
        if v is not None and v.weight.requires_grad:
            eye = torch.eye(b.hidden_size, device=v.weight.device, dtype=v.weight.dtype)
            term = 0.01 * (eye - v.weight).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return total


def set_active_adapter(model: nn.Module, name: str) -> nn.Module:
    """In models patched with ``fusion_config=False``, choose the one active adapter."""
    blocks = [b for _, b in fused_blocks(model)]
    if not blocks:
        raise ValueError("model has no FusedAdapterBlock")
    for b in blocks:
        if b.fusion_config is not None:
            raise ValueError("set_active_adapter applies to blocks without fusion; this model has a fusion")
        if name not in b.adapter_names:
            raise ValueError(f"unknown adapter {name!r}; the model has {b.adapter_names}")
    for b in blocks:
        b.active_adapter = name
    return model
