"""Swapping ``FusedAdapterBlock``s into HF BERT-family models, and converting AdapterHub models.

Where the blocks go: every encoder layer of a BERT-family model has an attention output module
(``layer.attention.output``: BertSelfOutput, RobertaSelfOutput, ...) and a feed-forward output
module (``layer.output``: BertOutput, ...), both ``dense -> dropout -> LayerNorm(. + input)``.
``output_adapter`` puts a block at the latter, ``mh_adapter`` at the former (Houlsby: both).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch.nn as nn

from .backends import check_name
from .block import FusedAdapterBlock, check_adapter_names
from .config import FusionConfig, load_adapter_config
from .model import fused_blocks, install

__all__ = ["patch_model", "patch_bert", "encoder_layers", "output_sites"]


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


def _model_dropout(model) -> float:
    cfg = getattr(model, "config", None)
    return float(getattr(cfg, "attention_probs_dropout_prob", 0.0) or 0.0)


def patch_model(
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
        raise TypeError(f"patch_model expects a torch.nn.Module (a transformers model), got {type(model).__name__}")
    names = check_adapter_names(adapter_names)
    check_name(backend)
    acfg = load_adapter_config(adapter_config)
    fcfg = False if fusion_config is False else FusionConfig.load(fusion_config)
    layers = encoder_layers(model)
    if next(fused_blocks(model), None) is not None:
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
    install(new)  # nothing is changed until every block was built
    return model


#: The function's first name, kept for code written against afkern 0.1.
patch_bert = patch_model
