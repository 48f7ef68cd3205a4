"""The site table: where AdapterHub (``adapters`` 1.3.0) runs its adapters in every family afkern
supports, on transformers 4.x and 5.x (types and mechanism: ``afkern/sites.py``; the research
behind every row, and how to add a family: docs/FAMILIES.md).

A new family is one :class:`Family` entry here. Each row names AdapterHub's ``h`` and
``residual_input`` as taps of the plain model (``"<module>:<out|arg0|arg1>"``, relative to the
layer), where the site output goes (``to``), the norm AdapterHub hands its adapters (None: a
norm-free site), and AdapterHub's module name for the site (its saved keys).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from .block import FusedAdapterBlock
from .sites import Family, Site, Stack, _get, base_model_of, slots_of

__all__ = ["FAMILIES", "UNSUPPORTED", "family_of", "supported_model_types", "describe_supported"]

MH, CROSS, OUT = "mh_adapter", "cross_adapter", "output_adapter"


def _pre_ln(layers: str, attn: str, ln1: str, ln2: str, mlp: str, out_module: str = "output_adapters",
            ah_layers: Optional[str] = None) -> Stack:
    """Pre-LN layer with inline adds (GPT-2, Llama, ViT on transformers 5): ``y = x + attn(ln1(x))``,
    ``out = y + mlp(ln2(y))``. AdapterHub: ``y' = site(attn, x)``, ``out = site(mlp, y')``."""
    return Stack(layers, (
        Site(MH, "attention_adapters", h=attn, r=f"{ln1}:arg0", to=(f"{ln2}:arg0",)),
        Site(OUT, out_module, h=mlp, r=f"{ln2}:arg0", to=(":out",)),
    ), ah_layers=ah_layers, inline_residual=True)


_BERT_STACK = Stack("encoder.layer.*", (
    Site(MH, "attention.output", swap="attention.output"),   # BertSelfOutput: dense, dropout, LayerNorm(. + input)
    Site(OUT, "output", swap="output"),                        # BertOutput
))

#: BERT-style model types tested with the swap entry (any other model_type whose encoder layers
#: have BertOutput-like modules with an ``nn.LayerNorm`` is accepted as BERT-style too).
BERT_STYLE = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "data2vec-text", "ernie", "layoutlm",
              "deberta-v2", "bert-generation")

_BART_SITES = dict(
    mh=Site(MH, "attention_adapters", h="self_attn:out", r="self_attn:arg0", to=("self_attn_layer_norm:out",),
            norm="self_attn_layer_norm"),
    cross=Site(CROSS, "cross_attention_adapters", h="encoder_attn:out", r="encoder_attn:arg0",
               to=("encoder_attn_layer_norm:out",), norm="encoder_attn_layer_norm"),
    out=Site(OUT, "output_adapters", h="fc2:out", r="fc1:arg0", to=("final_layer_norm:out",), norm="final_layer_norm"),
)


def _t5_stack(stack: str, locations: Tuple[str, ...]) -> Stack:
    # T5Layer{SelfAttention,CrossAttention,FF}: out = x + dropout(sublayer(layer_norm(x))); the
    # sub-layer module itself is AdapterHub's BottleneckLayer (keys "block.{i}.layer.{j}.adapters")
    return Stack(f"{stack}.block.*", tuple(
        Site(loc, f"layer.{j}", h=f"layer.{j}.dropout:out", r=f"layer.{j}:arg0", to=(f"layer.{j}:out",))
        for j, loc in enumerate(locations)))


_LLAMA_STACK = _pre_ln("layers.*", "self_attn:out", "input_layernorm", "post_attention_layernorm", "mlp:out")

FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("bert", BERT_STYLE, (_BERT_STACK,), title="BERT-style encoders (BERT, RoBERTa, XLM-R, ELECTRA, "
           "DeBERTa-v2, CamemBERT, Data2Vec-text, ERNIE, LayoutLM, BertGeneration)"),
    Family("deberta", ("deberta",), (_BERT_STACK,), title="DeBERTa v1"),
    Family("distilbert", ("distilbert",), (Stack("transformer.layer.*", (
        Site(MH, "attention_adapters", h="attention:out", r=":arg0", to=("sa_layer_norm:out",), norm="sa_layer_norm"),
        Site(OUT, "output_adapters", h="ffn:out", r="ffn:arg0", to=("output_layer_norm:out",), norm="output_layer_norm"),
    )),), score_dropout="attention_dropout", title="DistilBERT"),
    # one block per distinct AlbertLayer (as AdapterHub's adapters), run at every repetition of it
    Family("albert", ("albert",), (Stack("encoder.albert_layer_groups.*.albert_layers.*", (
        # AdapterHub passes (layer input, attention output): h and residual swapped against the rest
        Site(MH, "attention.attention_adapters", h="attention:arg0", r="attention.output_dropout:out",
             to=("attention.LayerNorm:out",), norm="attention.LayerNorm"),
        Site(OUT, "output_adapters", h="ffn_output:out", r="ffn:arg0", to=("full_layer_layer_norm:out",),
             norm="full_layer_layer_norm"),
    )),), requires=(("chunk_size_feed_forward", 0),), title="ALBERT"),
    Family("bart", ("bart", "plbart"), (
        Stack("encoder.layers.*", (_BART_SITES["mh"], _BART_SITES["out"])),
        Stack("decoder.layers.*", (_BART_SITES["mh"], _BART_SITES["cross"], _BART_SITES["out"])),
    ), score_dropout="attention_dropout", functional_dropout=("dropout", ("self_attn", "encoder_attn", "fc2")),
        title="BART, PLBart"),
    Family("t5", ("t5", "mt5"), (_t5_stack("encoder", (MH, OUT)), _t5_stack("decoder", (MH, CROSS, OUT))),
           score_dropout="dropout_rate", title="T5, mT5"),
    Family("gpt2", ("gpt2",), (_pre_ln("h.*", "attn:out", "ln_1", "ln_2", "mlp:out"),),
           score_dropout="attn_pdrop", requires=(("add_cross_attention", False),), title="GPT-2"),
    Family("llama", ("llama",), (_LLAMA_STACK,), score_dropout=None, title="Llama"),
    Family("mistral", ("mistral",), (_LLAMA_STACK,), score_dropout=None, title="Mistral"),
    # Qwen2 is an AdapterHub plugin-interface family: hooked sites, the same function as Llama's
    Family("qwen2", ("qwen2",), (_LLAMA_STACK,), score_dropout=None, title="Qwen2"),
    Family("vit", ("vit",), (Stack("encoder.layer.*", (
        Site(MH, "attention_adapters", h="attention:out", r="layernorm_before:arg0",
             to=("layernorm_after:arg0", "output:arg1")),
        Site(OUT, "output.output_adapters", h="output.dropout:out", r="output:arg1", to=("output:out",)),
    )),), stacks_v5=(
        # transformers 5: layers at "layers", one Dropout module after attention AND after the MLP
        _pre_ln("layers.*", "dropout:out@0", "layernorm_before", "layernorm_after", "dropout:out@1",
                out_module="output.output_adapters", ah_layers="encoder.layer.*"),
    ), title="ViT"),
)}

#: Families AdapterHub fuses that afkern does not place yet, and why.
UNSUPPORTED: Dict[str, str] = {
    "mbart": "pre-LN BART variant whose decoder skips the cross-attention site without encoder states",
    "whisper": "pre-LN encoder-decoder like mBART",
    "gptj": "parallel attention/MLP block: AdapterHub sums in another order than the plain model",
    "clip": "two towers of different widths in one model",
    "beit": "layer scale and stochastic depth around the sites",
    "xmod": "language adapters of its own, and a norm-free attention site inside a post-LN layer",
    "mpnet": "not an AdapterHub family",
    "megatron-bert": "pre-LN BERT: no LayerNorm in its output modules (not an AdapterHub family)",
    "encoder-decoder": "compose the encoder and decoder families instead",
}

_BY_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


def supported_model_types() -> List[str]:
    return sorted(_BY_TYPE)


def describe_supported() -> str:
    return ", ".join(f.title or f.name for f in FAMILIES.values())


def _is_output_module(m) -> bool:
    if isinstance(m, FusedAdapterBlock):
        return m.wraps_output
    return (all(hasattr(m, a) for a in ("dense", "LayerNorm", "dropout")) and isinstance(getattr(m, "dense"), nn.Linear)
            and isinstance(getattr(m, "LayerNorm"), nn.LayerNorm))


def _bert_style(model: nn.Module) -> bool:
    """Every encoder layer has BertOutput-like output modules (dense, dropout, nn.LayerNorm)."""
    layers = getattr(getattr(base_model_of(model), "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    return all(_is_output_module(getattr(layer, "output", None))
               and _is_output_module(getattr(getattr(layer, "attention", None), "output", None)) for layer in layers)


def _unsupported(model: nn.Module, why: str) -> TypeError:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return TypeError(
        f"{type(model).__name__} (model_type {mt!r}) is not supported by afkern: {why}. afkern places fused "
        f"AdapterFusion blocks in: {describe_supported()} (model_type {', '.join(supported_model_types())}, "
        "or any encoder whose layers have BertOutput-like output modules)"
    )


def family_of(model: nn.Module) -> Family:
    """The site-table entry of ``model`` (a transformers model, bare or with a head), or a
    TypeError that lists what is supported. Checks the entry's assumptions about the config and
    that its layers are where the table says."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    fam = _BY_TYPE.get(mt)
    if fam is None:
        if mt in UNSUPPORTED:
            raise _unsupported(model, UNSUPPORTED[mt])
        if _bert_style(model):
            return FAMILIES["bert"]
        raise _unsupported(model, "no site table entry for this model type, and its layers are not BERT-style "
                                  "(<model>.encoder.layer[i] with BertOutput-like attention.output and output modules)")
    for attr, want in fam.requires:
        got = getattr(config, attr, want)
        if got != want:
            raise TypeError(f"{type(model).__name__}: afkern's {fam.name} sites assume config.{attr} = {want!r}, "
                            f"got {got!r}")
    if not slots_of(model, fam):
        paths = ", ".join(st.layers for st in fam.stacks_for())
        raise _unsupported(model, f"model_type {mt!r} is a {fam.name} model, but none of its layer lists ({paths}) "
                                  "is where the site table expects it")
    if fam.name in ("bert", "deberta"):
        bad = [s.where for s in slots_of(model, fam) if not _swappable(s, fam.name == "bert")]
        if bad:
            raise _unsupported(model, f"its output modules at {bad[:2]} are not BertOutput-like (dense nn.Linear, "
                                      "dropout, LayerNorm)")
    return fam


def _swappable(slot, plain_ln: bool) -> bool:
    m = _get(slot.layer, slot.site.swap)
    if isinstance(m, FusedAdapterBlock):
        return m.wraps_output
    if plain_ln:
        return _is_output_module(m)
    return (m is not None and isinstance(getattr(m, "dense", None), nn.Linear) and hasattr(m, "dropout")
            and all(hasattr(getattr(m, "LayerNorm", None), a) for a in ("weight", "bias")))
