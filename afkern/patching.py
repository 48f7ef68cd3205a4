"""Placing ``FusedAdapterBlock``s in HF transformers models of every supported family.

Where the blocks go is data: the site table (``afkern/families.py``, mechanism in
``afkern/sites.py``, research in docs/FAMILIES.md). BERT-style encoders get their output modules
swapped (``BertOutput`` for ``output_adapter``, ``BertSelfOutput`` for ``mh_adapter``; Houlsby:
both); the other families keep their modules and get the block as ``<layer>.afkern_<site>`` with
hooks that hand it AdapterHub's ``h`` and ``residual_input`` and put its output where AdapterHub's
goes.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch.nn as nn

from .backends import check_name
from .block import FusedAdapterBlock, check_adapter_names
from .config import FusionConfig, load_adapter_config
from .families import family_of
from .record import track_model
from .model import fused_blocks, install
from .sites import Family, Slot, _get, install_sites, slots_of

__all__ = ["patch_model", "patch_bert", "encoder_layers", "output_sites", "build_site_block", "site_placed",
           "model_dropout"]


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


def model_dropout(model, family: Family = None) -> float:
    """AdapterHub's default fusion score dropout for ``model``: the config attribute its family maps
    ``attention_probs_dropout_prob`` to (0 where it maps none: Llama, Mistral, Qwen2)."""
    cfg = getattr(model, "config", None)
    attr = "attention_probs_dropout_prob" if family is None else family.score_dropout
    return float((getattr(cfg, attr, 0.0) if attr else 0.0) or 0.0)


_model_dropout = model_dropout


def site_placed(slot: Slot, acfg) -> bool:
    """Whether AdapterHub places an adapter of config ``acfg`` at ``slot`` (its location flag, and
    the layer not in ``leave_out``)."""
    return bool(getattr(acfg, slot.site.location)) and slot.index not in acfg.leave_out


def build_site_block(model: nn.Module, slot: Slot, names, acfg, fcfg, p_drop: float, backend: str) -> FusedAdapterBlock:
    """A new block for ``slot`` (not yet in the model): around the output module of a swap site,
    or a hook site's block with the site's norm attached (none at a norm-free site)."""
    if slot.site.kind == "swap":
        block = FusedAdapterBlock.from_output_module(
            _get(slot.layer, slot.site.swap), names, adapter_config=acfg, fusion_config=fcfg,
            attention_probs_dropout_prob=p_drop, backend=backend, layer_idx=slot.index,
        )
    else:
        p0 = next(slot.layer.parameters())
        block = FusedAdapterBlock(
            hidden_size=int(model.config.hidden_size), adapter_names=names, adapter_config=acfg, fusion_config=fcfg,
            attention_probs_dropout_prob=p_drop, backend=backend, layer_idx=slot.index, device=p0.device,
            dtype=p0.dtype, wrap_output=False,
        )
        block.attach_norm(_get(slot.layer, slot.site.norm) if slot.site.norm else None)
    block.train(model.training)
    return block


def check_placement(family: Family, acfg, model: nn.Module) -> None:
    """A ValueError if the config asks for a site the family lacks (AdapterHub would place nothing)."""
    have = family.locations()
    asked = [loc for loc in ("mh_adapter", "cross_adapter", "output_adapter") if getattr(acfg, loc)]
    lacking = [loc for loc in asked if loc not in have]
    if lacking:
        raise ValueError(f"the adapter config places {lacking} but a {family.name} model "
                         f"({type(model).__name__}) has no such site; its sites are {list(have)}")


def patch_model(
    model: nn.Module,
    adapter_names: Sequence[str],
    adapter_config=None,
    fusion_config=None,
    backend: str = "auto",
) -> nn.Module:
    """Place fused blocks in a loaded transformers model of any supported family (site table:
    ``afkern.families``), in place, where AdapterHub places the adapters of ``adapter_config``
    (Pfeiffer: after the feed-forward block; Houlsby: after attention too; ``cross_adapter``: at
    the decoder's cross-attention), and return it.

    New adapters and the fusion are initialised as AdapterHub initialises them; the model's own
    weights are kept (shared) and its ``state_dict`` keys unchanged (hook sites add
    ``<layer>.afkern_<site>.*``). A model of an unsupported family raises TypeError listing the
    supported ones, untouched. ``fusion_config=False`` adds the adapters
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
    family = family_of(model)
    if next(fused_blocks(model), None) is not None:
        raise ValueError("model already has FusedAdapterBlocks; patch a fresh model (or use load_adapterhub)")
    check_placement(family, acfg, model)
    slots = [s for s in slots_of(model, family) if site_placed(s, acfg)]
    if not slots:
        raise ValueError(f"the adapter config places no adapter in this {family.name} model (leave_out "
                         f"{list(acfg.leave_out)} covers every layer?)")
    p_drop = model_dropout(model, family)
    builds = [(s, build_site_block(model, s, names, acfg, fcfg, p_drop, backend)) for s in slots]
    install_sites(model, builds, install)  # nothing is changed until every block was built and checked
    track_model(model)  # the temperature clock and the config.afkern record (afkern.pretrained)
    return model


#: The function's first name, kept for code written against afkern 0.1.
patch_bert = patch_model
