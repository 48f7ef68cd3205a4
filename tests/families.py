"""Test oracle harness: tiny models of every priority family, plain and prepared with `adapters`.

Not a test file. Later parity tests parametrize over ``FAMILIES`` and compare afkern on the
*plain* model against AdapterHub's `adapters` 1.3.0 on the *same* base weights:

    spec = FAMILIES["gpt2"]
    plain = make_plain(spec)                          # tiny random transformers model, eval, float32
    hub = make_adapterhub(spec, "seq_bn", plain=plain)  # deep copy + adapters.init + 3 adapters + Fuse
    out = adapterhub_outputs(hub, spec, torch.float64)  # last hidden state, input-embedding grads

The plain half (configs, ``make_plain``, ``make_inputs``, ``run_with_grads``, the executable site
table ``hook_sites`` / ``HookReference``) needs only transformers and works on 4.57 and 5.x;
everything that touches `adapters` imports it lazily (it does not install on transformers 5,
AdapterHub issue #834). ``HookReference`` re-creates AdapterHub's computation on the *plain*
model from AdapterHub's weights: a second oracle, usable on transformers 5.

Design rules, and why:
- Canonical weights are float32-representable: models are built and perturbed in float32, and the
  float64 model is ``copy.deepcopy(model).double()``. So the float64 run is the exact-arithmetic
  reference *of the float32 model*, and float64/float32 differences are pure arithmetic rounding.
- Adapter and fusion weights are perturbed away from AdapterHub's init (std 0.02, zero biases,
  value = identity + 1e-6) and the fusion query is calibrated per fusion layer so the softmax is
  neither uniform nor one-hot: mean max probability per layer in [P_LOW, P_HIGH] (< 0.9).
- Everything is seeded by explicit ``torch.Generator``s; no global RNG state is read after the
  base model is built (which is built under ``torch.manual_seed(seed)``).
- Attention is "eager" everywhere (same kernels on both transformers versions, float64 capable).

See docs/FAMILIES.md for the site table these specs encode.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import transformers  # noqa: E402

from parity import rel_err  # noqa: E402,F401  (F.rel_err in the family tests)

TF_MAJOR = int(transformers.__version__.split(".")[0])

VOCAB = 99          # ids drawn from [FIRST_ID, VOCAB): clear of pad/bos/eos ids 0..2
FIRST_ID = 3
HIDDEN = 40         # odd-ish width: 4 heads of 10; bottleneck r = 40 // 5 = 8
HEADS = 4
INTER = 72
REDUCTION = 5
ADAPTER_NAMES = ("a", "b", "c")
P_LOW, P_HIGH = 0.5, 0.75   # calibration window for the mean max fusion probability (N = 3)
P_LIMIT = 0.9               # what the harness tests assert


# ----------------------------------------------------------------------------------------------
# Site table (AdapterHub 1.3.0 on transformers 4.57; the plain-model hook points of 4.57 and 5.x
# are ``hook_sites`` below; prose: docs/FAMILIES.md)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """One place where AdapterHub calls ``bottleneck_layer_forward(h, residual_input, layer_norm)``.

    location:  AdapterHub location key ("mh_adapter", "output_adapter", "cross_adapter").
    layers:    path of the layer list inside the *base model* (AdapterHub / transformers 4.57).
    module:    path, relative to one layer, of the module holding ``adapters`` /
               ``adapter_fusion_layer`` (the BottleneckLayer) -- the saved-key location.
    h, residual: what AdapterHub passes as ``hidden_states`` and ``residual_input`` (prose).
    norm:      path, relative to the layer, of the norm module handed to the adapter layer;
               None = ``layer_norm=None`` (norm-free site).
    swapped:   ALBERT's attention site: AdapterHub passes (layer input, attention output), i.e.
               h and residual swapped relative to every other family.
    hooked:    plugin ("AdapterModelInterface") site: called from a forward hook, with
               ``original_ln_after`` forced off and the model adding the residual itself.
    """

    location: str
    layers: str
    module: str
    h: str
    residual: str
    norm: Optional[str]
    swapped: bool = False
    hooked: bool = False


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_class: str                      # transformers class of the bare model
    make_config: Callable[[], object]
    kind: str                             # "encoder" | "decoder" | "encoder-decoder" | "vision"
    sites: Tuple[Site, ...]
    shared_layers: bool = False           # ALBERT: one AdapterHub layer applied num_hidden_layers times
    supports_double: bool = True          # DoubleSeqBnConfig (Houlsby) places an mh adapter
    supports_cross: bool = False          # cross_adapter=True adds the decoder cross-attention site
    model_kwargs: Dict[str, object] = field(default_factory=dict)
    notes: str = ""


def _cfg(cls_name, **kw):
    cls = getattr(transformers, cls_name)
    kw.setdefault("attn_implementation", "eager")
    return cls(**kw)


def _bert_like(cls_name, **extra):
    return lambda: _cfg(cls_name, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                        num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=64,
                        pad_token_id=0, **extra)


_BERT_SITES = (
    Site("mh_adapter", "encoder.layer", "attention.output",
         h="dropout(dense(self-attention context))  [BertSelfOutput]", residual="layer input (input_tensor)",
         norm="attention.output.LayerNorm"),
    Site("output_adapter", "encoder.layer", "output",
         h="dropout(dense(intermediate))  [BertOutput]", residual="attention block output (input_tensor)",
         norm="output.LayerNorm"),
)

_BART_SITES = (
    Site("mh_adapter", "encoder.layers", "attention_adapters",
         h="dropout(self_attn(x)[0])  (functional dropout)", residual="layer input x",
         norm="self_attn_layer_norm"),
    Site("output_adapter", "encoder.layers", "output_adapters",
         h="dropout(fc2(dropout(act(fc1(y)))))", residual="y = output of the attention site",
         norm="final_layer_norm"),
    Site("mh_adapter", "decoder.layers", "attention_adapters",
         h="dropout(self_attn(x)[0])", residual="layer input x", norm="self_attn_layer_norm"),
    Site("cross_adapter", "decoder.layers", "cross_attention_adapters",
         h="dropout(encoder_attn(y)[0])", residual="y = output of the self-attention site",
         norm="encoder_attn_layer_norm"),
    Site("output_adapter", "decoder.layers", "output_adapters",
         h="dropout(fc2(...))", residual="output of the cross (or self) attention site",
         norm="final_layer_norm"),
)

_T5_SITES = (
    Site("mh_adapter", "encoder.block", "layer.0",
         h="dropout(SelfAttention(layer_norm(x))[0])", residual="x = T5LayerSelfAttention input", norm=None),
    Site("output_adapter", "encoder.block", "layer.1",
         h="dropout(DenseReluDense(layer_norm(x)))", residual="x = T5LayerFF input", norm=None),
    Site("mh_adapter", "decoder.block", "layer.0",
         h="dropout(SelfAttention(layer_norm(x))[0])", residual="x", norm=None),
    Site("cross_adapter", "decoder.block", "layer.1",
         h="dropout(EncDecAttention(layer_norm(x))[0])", residual="x = T5LayerCrossAttention input", norm=None),
    Site("output_adapter", "decoder.block", "layer.2",
         h="dropout(DenseReluDense(layer_norm(x)))", residual="x = T5LayerFF input", norm=None),
)


def _pre_ln_sites(layers, attn_h, mlp_h, hooked=False):
    return (
        Site("mh_adapter", layers, "attention_adapters", h=attn_h,
             residual="layer input x (residual stream before the pre-attention norm)", norm=None, hooked=hooked),
        Site("output_adapter", layers, "output_adapters", h=mlp_h,
             residual="y = residual stream after the attention site (before the pre-MLP norm)", norm=None,
             hooked=hooked),
    )


FAMILIES: Dict[str, FamilySpec] = {
    "bert": FamilySpec(
        "bert", "BertModel", _bert_like("BertConfig"), "encoder", _BERT_SITES,
        model_kwargs={"add_pooling_layer": False}),
    "deberta": FamilySpec(
        "deberta", "DebertaModel",
        _bert_like("DebertaConfig", relative_attention=True, pos_att_type=["c2p", "p2c"],
                   max_relative_positions=16, type_vocab_size=0),
        "encoder",
        (Site("mh_adapter", "encoder.layer", "attention.output",
              h="dropout(dense(attention context))  [DebertaSelfOutput]", residual="layer input (query_states)",
              norm="attention.output.LayerNorm"),
         Site("output_adapter", "encoder.layer", "output",
              h="dropout(dense(intermediate))  [DebertaOutput]", residual="attention block output",
              norm="output.LayerNorm")),
        notes="DebertaLayerNorm (not nn.LayerNorm) normalises in float32 even for float64 inputs"),
    "distilbert": FamilySpec(
        "distilbert", "DistilBertModel",
        lambda: _cfg("DistilBertConfig", vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=HEADS,
                     hidden_dim=INTER, max_position_embeddings=64, pad_token_id=0),
        "encoder",
        (Site("mh_adapter", "transformer.layer", "attention_adapters",
              h="attention(...)[0] (out_lin, no dropout)", residual="layer input x", norm="sa_layer_norm"),
         Site("output_adapter", "transformer.layer", "output_adapters",
              h="ffn(y) = dropout(lin2(act(lin1(y))))", residual="y = sa site output",
              norm="output_layer_norm"))),
    "albert": FamilySpec(
        "albert", "AlbertModel",
        lambda: _cfg("AlbertConfig", vocab_size=VOCAB, embedding_size=24, hidden_size=HIDDEN,
                     num_hidden_layers=3, num_hidden_groups=1, inner_group_num=1, num_attention_heads=HEADS,
                     intermediate_size=INTER, max_position_embeddings=64, pad_token_id=0),
        "encoder",
        (Site("mh_adapter", "encoder.albert_layer_groups.0.albert_layers", "attention.attention_adapters",
              h="layer input x  (SWAPPED: AdapterHub passes hidden_states first)",
              residual="output_dropout(dense(context))  (the attention output)",
              norm="attention.LayerNorm", swapped=True),
         Site("output_adapter", "encoder.albert_layer_groups.0.albert_layers", "output_adapters",
              h="ffn_output(act(ffn(y)))  (no dropout)", residual="y = attention site output",
              norm="full_layer_layer_norm")),
        shared_layers=True, model_kwargs={"add_pooling_layer": False},
        notes="one shared AlbertLayer (and its adapters/fusion) is applied num_hidden_layers times"),
    "bart": FamilySpec(
        "bart", "BartModel",
        lambda: _cfg("BartConfig", vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INTER,
                     decoder_ffn_dim=INTER, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None),
        "encoder-decoder", _BART_SITES, supports_cross=True),
    "t5": FamilySpec(
        "t5", "T5Model",
        lambda: _cfg("T5Config", vocab_size=VOCAB, d_model=HIDDEN, d_kv=10, d_ff=INTER, num_layers=2,
                     num_decoder_layers=2, num_heads=HEADS, relative_attention_num_buckets=8,
                     relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0,
                     eos_token_id=1),
        "encoder-decoder", _T5_SITES, supports_cross=True,
        notes="the T5Layer{SelfAttention,CrossAttention,FF} module itself is the BottleneckLayer"),
    "gpt2": FamilySpec(
        "gpt2", "GPT2Model",
        lambda: _cfg("GPT2Config", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=64,
                     n_inner=INTER, bos_token_id=0, eos_token_id=0),
        "decoder", _pre_ln_sites("h", "attn(ln_1(x))[0]  (c_proj + resid_dropout inside GPT2Attention)",
                                 "mlp(ln_2(y))  (c_proj + dropout inside GPT2MLP)")),
    "llama": FamilySpec(
        "llama", "LlamaModel",
        lambda: _cfg("LlamaConfig", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                     num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                     max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "decoder", _pre_ln_sites("layers", "self_attn(input_layernorm(x))[0]  (o_proj output)",
                                 "mlp(post_attention_layernorm(y))  (down_proj output)")),
    "mistral": FamilySpec(
        "mistral", "MistralModel",
        lambda: _cfg("MistralConfig", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                     num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                     max_position_embeddings=64, sliding_window=None, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2),
        "decoder", _pre_ln_sites("layers", "self_attn(input_layernorm(x))[0]  (o_proj output)",
                                 "mlp(post_attention_layernorm(y))  (down_proj output)")),
    "qwen2": FamilySpec(
        "qwen2", "Qwen2Model",
        lambda: _cfg("Qwen2Config", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                     num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                     max_position_embeddings=64, use_sliding_window=False, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2),
        "decoder", _pre_ln_sites("layers", "self_attn.o_proj output (forward hook)",
                                 "mlp.down_proj output (forward hook)", hooked=True),
        notes="plugin family (adapters/wrappers/interfaces.py): hooks, original_ln_after forced off"),
    "vit": FamilySpec(
        "vit", "ViTModel",
        lambda: _cfg("ViTConfig", image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN,
                     num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=INTER),
        "vision",
        (Site("mh_adapter", "encoder.layer", "attention_adapters",
              h="attention(layernorm_before(x))  (ViTSelfOutput: dense + dropout)", residual="layer input x",
              norm=None),
         Site("output_adapter", "encoder.layer", "output.output_adapters",
              h="dropout(dense(intermediate))  [ViTOutput]", residual="y = attention site output",
              norm=None)),
        model_kwargs={"add_pooling_layer": False}),
}

PRIORITY = ("deberta", "distilbert", "albert", "bart", "t5", "gpt2", "llama", "mistral", "qwen2", "vit")


def variants(spec: FamilySpec) -> Tuple[str, ...]:
    """Adapter configurations the harness builds for a family."""
    out = ["seq_bn"]
    if spec.supports_double:
        out.append("double_seq_bn")
    if spec.supports_cross:
        out.append("seq_bn_cross")
    return tuple(out)


def active_sites(spec: FamilySpec, variant: str) -> Tuple[Site, ...]:
    keep = {"seq_bn": {"output_adapter"}, "double_seq_bn": {"mh_adapter", "output_adapter"},
            "seq_bn_cross": {"output_adapter", "cross_adapter"}}[variant]
    return tuple(s for s in spec.sites if s.location in keep)


# ----------------------------------------------------------------------------------------------
# Plain models and inputs (transformers 4.57 and 5.x)
# ----------------------------------------------------------------------------------------------


def make_plain(spec: FamilySpec, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random plain transformers model in eval mode (built in float32, then cast)."""
    config = spec.make_config()
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config, **spec.model_kwargs)
    model.eval()
    return model.to(dtype)


def make_inputs(spec: FamilySpec, batch: int = 2, seq: int = 7, pad_from: int = 5, dec_seq: int = 5,
                dec_pad_from: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Deterministic model inputs; the last row of every text input is right-padded."""
    g = torch.Generator().manual_seed(1000 + seed)
    if spec.kind == "vision":
        config = spec.make_config()
        shape = (batch, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)}
    ids = torch.randint(FIRST_ID, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, pad_from:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if spec.kind == "encoder-decoder":
        dec = torch.randint(FIRST_ID, VOCAB, (batch, dec_seq), generator=g)
        dmask = torch.ones(batch, dec_seq, dtype=torch.long)
        dmask[-1, dec_pad_from:] = 0
        out.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
    if spec.kind in ("decoder", "encoder-decoder"):
        out["use_cache"] = False
    return out


def cast_inputs(inputs: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def embedding_modules(model, spec: FamilySpec) -> List[torch.nn.Module]:
    """The modules whose outputs are the 'input embeddings' (gradients are taken w.r.t. them).

    Encoder-decoders: the encoder's and the decoder's token embeddings, deduplicated (T5 shares one
    module, called twice; BART has two BartScaledWordEmbedding modules tied to ``shared``, so a
    hook on ``get_input_embeddings()`` alone would never fire). Vision: ``model.embeddings``.
    """
    if spec.kind == "vision":
        return [model.embeddings]
    if spec.kind == "encoder-decoder":
        mods = [model.get_encoder().get_input_embeddings(), model.get_decoder().get_input_embeddings()]
        out = []
        for m in mods:
            if all(m is not o for o in out):
                out.append(m)
        return out
    return [model.get_input_embeddings()]


def token_mask(spec: FamilySpec, inputs) -> Optional[torch.Tensor]:
    """Mask of the positions of the returned last hidden state that are real tokens."""
    if spec.kind == "vision":
        return None
    if spec.kind == "encoder-decoder":
        return inputs["decoder_attention_mask"].bool()
    return inputs["attention_mask"].bool()


@dataclass
class Outputs:
    hidden: torch.Tensor                     # last hidden state (decoder's for encoder-decoders)
    encoder_hidden: Optional[torch.Tensor]   # encoder last hidden state (encoder-decoders)
    embed_grads: List[torch.Tensor]          # grads of the embedding outputs, in call order
    pixel_grad: Optional[torch.Tensor] = None


def run_with_grads(model, spec: FamilySpec, inputs: Dict[str, torch.Tensor], seed: int = 7) -> Outputs:
    """Forward + backward of sum(w * hidden) (+ encoder hidden), w fixed by ``seed``.

    Works for a plain model, an AdapterHub model or a patched afkern model alike.
    """
    dtype = next(model.parameters()).dtype
    inputs = cast_inputs(inputs, dtype)
    model.zero_grad(set_to_none=True)
    captured: List[torch.Tensor] = []

    def keep(_m, _a, out):
        t = out[0] if isinstance(out, tuple) else out
        if t.requires_grad:
            t.retain_grad()
        captured.append(t)

    if "pixel_values" in inputs:
        inputs = dict(inputs)
        inputs["pixel_values"] = inputs["pixel_values"].clone().requires_grad_(True)
    handles = [m.register_forward_hook(keep) for m in embedding_modules(model, spec)]
    try:
        out = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    hidden = out.last_hidden_state
    enc = getattr(out, "encoder_last_hidden_state", None)
    g = torch.Generator().manual_seed(seed)
    loss = (hidden * torch.randn(hidden.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    if enc is not None:
        loss = loss + (enc * torch.randn(enc.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    loss.backward()
    grads = [t.grad for t in captured]
    return Outputs(hidden.detach(), None if enc is None else enc.detach(), grads,
                   inputs["pixel_values"].grad if "pixel_values" in inputs else None)


# ----------------------------------------------------------------------------------------------
# Executable site table: AdapterHub's computation re-created on a PLAIN model with hooks
# (transformers 4.57 and 5.x, no `adapters` needed). A second oracle: on 4.57 it must equal
# AdapterHub; on 5.x it is what afkern is compared with where `adapters` cannot be installed.
# ----------------------------------------------------------------------------------------------

# AdapterHub 1.3.0 defaults of the configs the harness uses (checked against `adapters` in the tests)
ADAPTER_FLAGS = {
    "seq_bn": dict(original_ln_before=True, original_ln_after=True, residual_before_ln=True,
                   non_linearity="relu", scaling=1.0, mh_adapter=False, output_adapter=True, cross_adapter=False),
    "double_seq_bn": dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True,
                          non_linearity="swish", scaling=1.0, mh_adapter=True, output_adapter=True,
                          cross_adapter=False),
    "seq_bn_cross": dict(original_ln_before=True, original_ln_after=True, residual_before_ln=True,
                         non_linearity="relu", scaling=1.0, mh_adapter=False, output_adapter=True,
                         cross_adapter=True),
}
FUSION_FLAGS = {
    "dynamic": dict(query=True, key=True, value=True, query_before_ln=False, residual_before=False,
                    temperature=False, value_before_softmax=True),
    "static": dict(query=True, key=True, value=False, query_before_ln=False, residual_before=False,
                   temperature=False, value_before_softmax=True),
}


def reference_site(h, r, norm, w, flags, fflags, names=ADAPTER_NAMES):
    """AdapterHub's ``bottleneck_layer_forward(h, r, norm)`` for an active ``Fuse(*names)``, naive.

    ``w``: {"adapters.<n>.adapter_down.0.weight": ..., "adapter_fusion_layer.<f>.query.weight": ...}
    relative to the site, or None (no active adapter at this site: AdapterHub's fallback
    ``norm(h + r)`` / ``h + r``). ``norm`` is the model's own module (called, never re-implemented:
    DebertaLayerNorm normalises in float32). Mirrors Adapter.pre_forward / forward / post_forward
    and BertFusion.forward (eval: no dropout, temperature off).
    """
    from transformers.activations import get_activation

    if w is None:
        return norm(h + r) if norm is not None else h + r
    rbl = flags["residual_before_ln"]
    residual = h if rbl is True else None
    query = h if fflags["query_before_ln"] else None
    x = h
    if flags["original_ln_before"]:
        if norm is not None:
            x = x + r
            if rbl == "post_add":
                residual = x
            x = norm(x)
        elif r is not None:
            x = x + r
    if not rbl:
        residual = x
    if residual is None:  # AdapterHub: UnboundLocalError
        raise ValueError("residual_before_ln='post_add' without a layer norm (or with original_ln_before=False) "
                         "crashes in AdapterHub 1.3.0 (UnboundLocalError)")
    if not fflags["query_before_ln"]:
        query = x
    act = get_activation(flags["non_linearity"].lower())
    fusion = ",".join(names)
    ups = []
    for n in names:
        g = act(torch.nn.functional.linear(x, w[f"adapters.{n}.adapter_down.0.weight"],
                                           w[f"adapters.{n}.adapter_down.0.bias"]))
        ups.append(torch.nn.functional.linear(g, w[f"adapters.{n}.adapter_up.weight"],
                                              w[f"adapters.{n}.adapter_up.bias"]) * flags["scaling"])
    up = torch.stack(ups, dim=-2)                                   # [..., N, d]
    fw = lambda k: w.get(f"adapter_fusion_layer.{fusion}.{k}")       # noqa: E731
    value = up + residual.unsqueeze(-2) if fflags["residual_before"] else up
    q = torch.nn.functional.linear(query, fw("query.weight"), fw("query.bias")) if fflags["query"] else query
    k = torch.nn.functional.linear(up, fw("key.weight"), fw("key.bias")) if fflags["key"] else up
    v = value
    if fflags["value"] and fflags["value_before_softmax"]:
        v = torch.nn.functional.linear(value, fw("value.weight"))
    p = torch.softmax(torch.matmul(q.unsqueeze(-2), k.transpose(-2, -1)).squeeze(-2), dim=-1)
    ctx = torch.matmul(p.unsqueeze(-2), v).squeeze(-2)
    if fflags["value"] and not fflags["value_before_softmax"]:
        ctx = torch.nn.functional.linear(ctx, fw("value.weight"))
    if not fflags["residual_before"]:
        ctx = ctx + residual
    if flags["original_ln_after"]:
        ctx = norm(ctx + r) if norm is not None else ctx + r
    return ctx


@dataclass(frozen=True)
class HookSite:
    """One site of the executable site table (per transformers major version).

    Tap notation: (path relative to the layer, how): "out" = the module's output (element 0 of a
    tuple), "out@k" = its output at the k-th call within one layer call (a module used twice),
    "arg0" = its first input (positional or the hidden_states/x keyword), "arg1" = second input.
    ``replace``: taps whose value becomes the site output: "out" replaces the module's output
    (element 0 of a tuple), "arg0"/"arg1" replace an input in a forward pre-hook. Path "" = the
    layer itself (its output: the pre-LN families, whose residual adds are inline in the layer).
    ``ah``: AdapterHub weight-key prefix (4.57 module names, also on 5.x), {i} = position in the
    layer list.
    """

    location: str
    layers: str
    h: Tuple[str, str]
    r: Tuple[str, str]
    replace: Tuple[Tuple[str, str], ...]
    norm: Optional[str]
    ah: str


def _post_ln(layers, ah, loc, h, r, norm, rep=None):
    return HookSite(loc, layers, h, r, ((rep or norm, "out"),), norm, ah)


def _pre_ln(layers, ah, attn, ln1, ln2, mlp, out_module="output_adapters"):
    """Pre-LN layer with inline adds (GPT-2, Llama, Mistral, Qwen2, ViT on 5.x)."""
    return (
        HookSite("mh_adapter", layers, attn, (ln1, "arg0"), ((ln2, "arg0"),), None, ah + ".attention_adapters"),
        HookSite("output_adapter", layers, mlp, (ln2, "arg0"), (("", "out"),), None, f"{ah}.{out_module}"),
    )


def hook_sites(name: str, major: int = TF_MAJOR) -> Tuple[HookSite, ...]:
    """The executable site table of a family on transformers ``major`` (4 or 5)."""
    E = "encoder.layer"
    if name in ("bert", "deberta"):
        return (
            _post_ln(E, E + ".{i}.attention.output", "mh_adapter", ("attention.output.dropout", "out"),
                     ("attention.output", "arg1"), "attention.output.LayerNorm", rep="attention.output"),
            _post_ln(E, E + ".{i}.output", "output_adapter", ("output.dropout", "out"), ("output", "arg1"),
                     "output.LayerNorm", rep="output"),
        )
    if name == "distilbert":
        L = "transformer.layer"
        return (
            _post_ln(L, L + ".{i}.attention_adapters", "mh_adapter", ("attention", "out"), ("", "arg0"),
                     "sa_layer_norm"),
            _post_ln(L, L + ".{i}.output_adapters", "output_adapter", ("ffn", "out"), ("ffn", "arg0"),
                     "output_layer_norm"),
        )
    if name == "albert":
        L = "encoder.albert_layer_groups.0.albert_layers"
        return (
            # AdapterHub passes (layer input, attention output): h = x, r = attention output
            _post_ln(L, L + ".{i}.attention.attention_adapters", "mh_adapter", ("attention", "arg0"),
                     ("attention.output_dropout", "out"), "attention.LayerNorm"),
            _post_ln(L, L + ".{i}.output_adapters", "output_adapter", ("ffn_output", "out"), ("ffn", "arg0"),
                     "full_layer_layer_norm"),
        )
    if name == "bart":
        out = []
        for stack in ("encoder", "decoder"):
            L = f"{stack}.layers"
            out.append(_post_ln(L, L + ".{i}.attention_adapters", "mh_adapter", ("self_attn", "out"),
                                ("self_attn", "arg0"), "self_attn_layer_norm"))
            if stack == "decoder":
                out.append(_post_ln(L, L + ".{i}.cross_attention_adapters", "cross_adapter", ("encoder_attn", "out"),
                                    ("encoder_attn", "arg0"), "encoder_attn_layer_norm"))
            out.append(_post_ln(L, L + ".{i}.output_adapters", "output_adapter", ("fc2", "out"), ("fc1", "arg0"),
                                "final_layer_norm"))
        return tuple(out)
    if name == "t5":
        out = []
        for stack, subs in (("encoder", ("mh_adapter", "output_adapter")),
                            ("decoder", ("mh_adapter", "cross_adapter", "output_adapter"))):
            L = f"{stack}.block"
            for j, loc in enumerate(subs):
                out.append(HookSite(loc, L, (f"layer.{j}.dropout", "out"), (f"layer.{j}", "arg0"),
                                    ((f"layer.{j}", "out"),), None, L + ".{i}.layer." + str(j)))
        return tuple(out)
    if name == "gpt2":
        return _pre_ln("h", "h.{i}", ("attn", "out"), "ln_1", "ln_2", ("mlp", "out"))
    if name in ("llama", "mistral", "qwen2"):
        return _pre_ln("layers", "layers.{i}", ("self_attn", "out"), "input_layernorm", "post_attention_layernorm",
                       ("mlp", "out"))
    if name == "vit":
        if major < 5:
            return (
                HookSite("mh_adapter", E, ("attention", "out"), ("layernorm_before", "arg0"),
                         (("layernorm_after", "arg0"), ("output", "arg1")), None, E + ".{i}.attention_adapters"),
                HookSite("output_adapter", E, ("output.dropout", "out"), ("output", "arg1"), (("output", "out"),),
                         None, E + ".{i}.output.output_adapters"),
            )
        # 5.x: ViTLayer(attention, mlp, one Dropout module used after both, inline adds); layers at "layers"
        return _pre_ln("layers", "encoder.layer.{i}", ("dropout", "out@0"), "layernorm_before", "layernorm_after",
                       ("dropout", "out@1"), out_module="output.output_adapters")
    raise KeyError(name)


def _get(root, path):
    for part in filter(None, path.split(".")):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


_HIDDEN_KW = ("hidden_states", "x", "query", "input")


def _arg(args, kwargs, which):
    if which == "arg0":
        if args:
            return args[0]
        for k in _HIDDEN_KW:
            if k in kwargs:
                return kwargs[k]
    if which == "arg1":
        if len(args) > 1:
            return args[1]
        return kwargs["input_tensor"]
    raise KeyError(which)


def _set_arg(args, kwargs, which, value):
    args = list(args)
    if which == "arg0":
        if args:
            args[0] = value
        else:
            kwargs = dict(kwargs)
            kwargs[next(k for k in _HIDDEN_KW if k in kwargs)] = value
    else:
        if len(args) > 1:
            args[1] = value
        else:
            kwargs = dict(kwargs)
            kwargs["input_tensor"] = value
    return tuple(args), kwargs


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, value):
    return (value,) + tuple(out[1:]) if isinstance(out, tuple) else value


class HookReference:
    """Installs ``reference_site`` at every site of a plain model via forward (pre-)hooks.

    weights: AdapterHub state_dict entries (its key names, e.g. from ``hub.state_dict()`` or a
    ``save_adapter`` / ``save_adapter_fusion`` file). Sites without weights run AdapterHub's
    no-adapter fallback, which is bit-identical to the plain model's own add (+ norm).
    Per-layer-call state is cleared by a pre-hook on the layer, so shared (ALBERT) and repeated
    modules (ViT 5.x dropout) work. Eval mode only: BART-family hidden dropout is functional
    (F.dropout after the tapped module), so training-mode parity is not reachable with hooks.
    """

    def __init__(self, model, spec: FamilySpec, weights: Dict[str, torch.Tensor], variant: str = "seq_bn",
                 fusion: str = "dynamic", names=ADAPTER_NAMES, major: int = TF_MAJOR):
        self.flags, self.fflags, self.names = ADAPTER_FLAGS[variant], FUSION_FLAGS[fusion], names
        self.handles = []
        self.states: Dict[int, dict] = {}
        dtype = next(model.parameters()).dtype
        weights = {k: v for k, v in weights.items() if _is_adapter_param(k)}
        for site in hook_sites(spec.name, major):
            for pos, layer in enumerate(_get(model, site.layers)):
                prefix = site.ah.format(i=pos) + "."
                w = {k[len(prefix):]: v.to(dtype) for k, v in weights.items() if k.startswith(prefix)}
                self._install(layer, site, w or None)

    def _install(self, layer, site: HookSite, w):
        if id(layer) not in self.states:
            state = self.states[id(layer)] = {}
            self.handles.append(layer.register_forward_pre_hook(lambda m, a: state.clear()))
        state = self.states[id(layer)]
        key = site.location
        # .forward: the norm module itself may carry this site's replacing hook
        norm = _get(layer, site.norm).forward if site.norm else None

        def tap(path, how, slot):
            mod = _get(layer, path)
            if how.startswith("out"):
                call = int(how.split("@")[1]) if "@" in how else None
                counter = f"{slot}#calls"

                def hook(m, a, out):
                    n = state.get(counter, 0)
                    state[counter] = n + 1
                    if call is None or call == n:
                        state[slot] = _first(out)
                self.handles.append(mod.register_forward_hook(hook))
            else:
                def pre(m, a, kw):
                    state[slot] = _arg(a, kw, how)
                self.handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))

        def site_value():
            if key not in state:
                state[key] = reference_site(state[key + ".h"], state[key + ".r"], norm, w, self.flags, self.fflags,
                                            self.names)
            return state[key]

        # replacements first, so that taps on the same module see the replaced values
        for path, how in site.replace:
            mod = _get(layer, path)
            if how == "out":
                if site.r[1].startswith("arg") and site.r[0] == path:
                    # r is an input of the replaced module: read it in the same forward hook
                    def hook(m, a, kw, out, how_r=site.r[1]):
                        state[key + ".r"] = _arg(a, kw, how_r)
                        return _with_first(out, site_value())
                else:
                    def hook(m, a, kw, out):
                        return _with_first(out, site_value())
                self.handles.append(mod.register_forward_hook(hook, with_kwargs=True))
            else:
                def pre(m, a, kw, how=how):
                    return _set_arg(a, kw, how, site_value())
                self.handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        tap(*site.h, key + ".h")
        if not (site.r[1].startswith("arg") and any(p == site.r[0] and h == "out" for p, h in site.replace)):
            tap(*site.r, key + ".r")

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# ----------------------------------------------------------------------------------------------
# AdapterHub side (transformers 4.57 + adapters 1.3.0 only)
# ----------------------------------------------------------------------------------------------


def adapter_config(variant: str):
    import adapters

    kw = {"reduction_factor": REDUCTION}
    if variant == "seq_bn":
        return adapters.SeqBnConfig(**kw)
    if variant == "double_seq_bn":
        return adapters.DoubleSeqBnConfig(**kw)
    if variant == "seq_bn_cross":
        return adapters.SeqBnConfig(cross_adapter=True, **kw)
    raise ValueError(f"unknown variant {variant!r}; expected one of seq_bn, double_seq_bn, seq_bn_cross")


def make_adapterhub(spec: FamilySpec, variant: str = "seq_bn", plain=None, seed: int = 0,
                    names=ADAPTER_NAMES, fusion: str = "dynamic", calibrate: bool = True, zero_added: bool = True):
    """A deep copy of ``plain`` prepared with `adapters`: N adapters, a Fuse, all perturbed.

    The base weights are those of ``plain`` (built with ``make_plain(spec, seed)`` if not given),
    so afkern on ``plain`` and AdapterHub on the result compute the same function; with
    ``zero_added=False`` the parameters ``adapters.init`` adds to the base model keep AdapterHub's
    values (DeBERTa v1's random in_proj bias, :func:`zero_added_base_params_`).
    """
    import adapters
    from adapters import Fuse

    if plain is None:
        plain = make_plain(spec, seed)
    model = copy.deepcopy(plain).float().eval()   # adapters.init must run in float32 (LoRA wrappers
    adapters.init(model)                           # are rebuilt in the default dtype)
    model._afkern_zeroed = zero_added_base_params_(model, plain) if zero_added else []
    cfg = adapter_config(variant)
    for n in names:
        model.add_adapter(n, config=cfg)
    fuse = Fuse(*names)
    fusion_cfg = adapters.DynamicAdapterFusionConfig() if fusion == "dynamic" else adapters.StaticAdapterFusionConfig()
    model.add_adapter_fusion(fuse, config=fusion_cfg)
    model.set_active_adapters(fuse)
    model.eval()
    perturb_adapterhub_(model, seed=seed)
    if calibrate:
        calibrate_fusion_(model, spec, make_inputs(spec, seed=seed))
    return model



def build(name: str, variant: str):
    """(spec, plain model, AdapterHub model with three adapters and an active Fuse) of a family."""
    spec = FAMILIES[name]
    plain = make_plain(spec)
    return spec, plain, make_adapterhub(spec, variant, plain=plain)

def zero_added_base_params_(model, plain) -> List[str]:
    """Zero the non-adapter parameters that ``adapters.init`` added to the base model.

    AdapterHub 1.3.0 wraps DeBERTa v1's bias-free ``attention.self.in_proj`` in LoRAMergedLinear,
    whose constructor creates ``nn.Linear(..., bias=True)`` and keeps that randomly initialised
    bias because the original has none: ``adapters.init`` silently changes DeBERTa's function
    (by ~0.3 relative here, with no adapter active). The oracle is AdapterHub *with that bias
    zeroed*, i.e. the plain model's function. Returns the names zeroed.
    """
    known = dict(plain.named_parameters())
    zeroed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in known and not _is_adapter_param(name):
                p.zero_()
                zeroed.append(name)
    return zeroed


def _is_adapter_param(name: str) -> bool:
    return ".adapters." in f".{name}" or ".adapter_fusion_layer." in f".{name}"


def perturb_adapterhub_(model, seed: int = 0):
    """Replace AdapterHub's near-zero init by O(1) random adapter/fusion weights (float32 values)."""
    g = torch.Generator().manual_seed(50_000 + seed)

    def rnd(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float64) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if not _is_adapter_param(name):
                continue
            leaf = name.rsplit(".", 2)[-2:]
            if "adapter_fusion_layer" in name:
                d = p.shape[-1]
                if leaf[0] == "value":
                    new = torch.eye(d, dtype=torch.float64) + rnd(p.shape, 0.15 / d**0.5)
                elif leaf[1] == "weight":
                    new = rnd(p.shape, 1.0 / d**0.5)
                else:
                    new = rnd(p.shape, 0.2)
            elif leaf[1] == "weight" and p.dim() == 2:
                new = rnd(p.shape, 1.0 / p.shape[1] ** 0.5)   # fan-in scaled down / up projections
            else:
                new = rnd(p.shape, 0.2)                        # biases (and any adapter LN)
            p.copy_(new.to(p.dtype))
    return model


def fusion_modules(model) -> Dict[str, torch.nn.Module]:
    """{qualified name: BertFusion} for every AdapterFusion layer in the model."""
    from adapters.methods.modeling import BertFusion

    return {n: m for n, m in model.named_modules() if isinstance(m, BertFusion)}


class FusionProbe:
    """Records AdapterHub's fusion softmax of every call by recomputing it in a pre-hook.

    BertFusion builds a fresh ``nn.Softmax`` on every call, so there is no module to hook; the
    pre-hook sees (query, key, value, residual) and the temperature *before* it is annealed, and
    recomputes ``softmax((query(q) . key(k)) / T)`` exactly as BertFusion.forward does (eval mode:
    no score dropout). One record per call (ALBERT's shared layer gives several per module).
    """

    def __init__(self, model):
        self.records: List[Tuple[str, torch.Tensor]] = []
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in fusion_modules(model).items()]

    def _hook(self, name):
        def hook(mod, args):
            query, key = args[0], args[1]
            with torch.no_grad():
                q = mod.query(query) if mod.config["query"] else query
                k = mod.key(key) if mod.config["key"] else key
                scores = torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)).squeeze(2)
                self.records.append((name, torch.softmax(scores / mod.T, dim=-1).detach()))
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def fusion_max_prob(model, spec: FamilySpec, inputs=None) -> List[Tuple[str, float]]:
    """[(fusion layer name, mean over tokens of the max fusion probability)], one per call."""
    inputs = make_inputs(spec) if inputs is None else inputs
    dtype = next(model.parameters()).dtype
    with FusionProbe(model) as probe, torch.no_grad():
        model(**cast_inputs(inputs, dtype))
    return [(n, p.max(dim=-1).values.double().mean().item()) for n, p in probe.records]


def calibrate_fusion_(model, spec: FamilySpec, inputs, low: float = P_LOW, high: float = P_HIGH,
                      rounds: int = 40):
    """Scale each fusion layer's query map until its mean max probability is in [low, high].

    Deterministic (no randomness); scales are powers of a fixed factor, applied in float32.
    """
    mods = fusion_modules(model)
    for _ in range(rounds):
        per: Dict[str, List[float]] = {}
        for n, v in fusion_max_prob(model, spec, inputs):
            per.setdefault(n, []).append(v)
        done = True
        with torch.no_grad():
            for n, vals in per.items():
                m = sum(vals) / len(vals)
                if m > high or max(vals) >= P_LIMIT - 0.02:
                    factor = 0.8
                elif m < low:
                    factor = 1.25
                else:
                    continue
                done = False
                q = mods[n].query
                q.weight.mul_(factor)
                q.bias.mul_(factor)
        if done:
            return model
    return model


def adapterhub_outputs(model, spec: FamilySpec, dtype: torch.dtype, inputs=None, seed: int = 7) -> Outputs:
    """AdapterHub's outputs in ``dtype`` (the float32 weights, cast), without touching ``model``."""
    inputs = make_inputs(spec) if inputs is None else inputs
    m = copy.deepcopy(model).to(dtype)
    return run_with_grads(m, spec, inputs, seed=seed)


def state_dict_key_patterns(model, names=ADAPTER_NAMES) -> List[str]:
    """The model's adapter/fusion state_dict keys, normalised by ``normalise_key``."""
    return sorted({normalise_key(k, names) for k in model.state_dict() if _is_adapter_param(k)})


def normalise_key(key: str, names=ADAPTER_NAMES) -> str:
    """Replace layer indices by {i}, the fusion name by {fusion}, adapter names by {name}."""
    fusion = ",".join(names)
    key = key.replace(f".{fusion}.", ".{fusion}.")
    for n in names:
        key = key.replace(f".adapters.{n}.", ".adapters.{name}.")
    # layer indices: a number right after a layer-list segment. T5's "block.N.layer.M": M is the
    # sub-layer (0 self-attn, 1 cross-attn or FF, 2 FF) and is kept.
    key = re.sub(r"(^|\.)(block|layers|h|albert_layers)\.\d+\.", r"\1\2.{i}.", key)
    key = re.sub(r"(^|\.)albert_layer_groups\.\d+\.", r"\1albert_layer_groups.{g}.", key)
    key = re.sub(r"(^|\.)(?<!\{i\}\.)layer\.\d+\.", r"\1layer.{i}.", key)
    return key


ADAPTER_LEAVES = ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias")
FUSION_LEAVES = {"dynamic": ("query.weight", "query.bias", "key.weight", "key.bias", "value.weight"),
                 "static": ("query.weight", "query.bias", "key.weight", "key.bias")}


def site_key_prefix(site: Site) -> str:
    """Normalised AdapterHub key prefix of a site, e.g. 'h.{i}.output_adapters'."""
    return normalise_key(f"{site.layers}.0.{site.module}.x")[:-2]


def expected_key_patterns(spec: FamilySpec, variant: str, fusion: str = "dynamic") -> Dict[str, List[str]]:
    """The normalised keys save_adapter / save_adapter_fusion must write for a bare model.

    (A model with a head prefixes them with its base_model_prefix, e.g. 'transformer.' for
    GPT2LMHeadModel; see docs/FAMILIES.md.)
    """
    sites = active_sites(spec, variant)
    return {
        "adapter": sorted(f"{site_key_prefix(s)}.adapters.{{name}}.{leaf}" for s in sites for leaf in ADAPTER_LEAVES),
        "fusion": sorted(f"{site_key_prefix(s)}.adapter_fusion_layer.{{fusion}}.{leaf}"
                         for s in sites for leaf in FUSION_LEAVES[fusion]),
    }


def saved_keys(model, names=ADAPTER_NAMES, tmpdir: str = None) -> Dict[str, List[str]]:
    """Run save_adapter / save_adapter_fusion and return {"adapter": keys, "fusion": keys} as saved."""
    import tempfile

    from adapters import Fuse

    tmp = tmpdir or tempfile.mkdtemp(prefix="afkern_families_")
    ad_dir = os.path.join(tmp, names[0])
    fu_dir = os.path.join(tmp, ",".join(names))
    model.save_adapter(ad_dir, names[0])
    model.save_adapter_fusion(fu_dir, Fuse(*names))
    return {"adapter": sorted(_load_keys(ad_dir, "pytorch_adapter.bin")),
            "fusion": sorted(_load_keys(fu_dir, "pytorch_model_adapter_fusion.bin")),
            "dirs": [ad_dir, fu_dir]}


def _load_keys(folder, fname):
    return list(torch.load(os.path.join(folder, fname), map_location="cpu", weights_only=True).keys())


# ----------------------------------------------------------------------------------------------
# Cross-version runner: the hook reference on transformers 5.x, fed with weights from 4.57
# ----------------------------------------------------------------------------------------------

_VIT_4_TO_5 = (
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)


def convert_plain_state(name: str, state: Dict[str, torch.Tensor], major: int = TF_MAJOR) -> Dict[str, torch.Tensor]:
    """A plain model's 4.57 state_dict renamed for transformers ``major`` (only ViT differs)."""
    if name != "vit" or major < 5:
        return dict(state)
    out = {}
    for k, v in state.items():
        for pat, rep in _VIT_4_TO_5:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def export_case(spec: FamilySpec, variant: str, plain, hub) -> dict:
    """What another process (another transformers version) needs to rebuild the oracle."""
    return {"family": spec.name, "variant": variant,
            "plain_state": {k: v.detach().clone() for k, v in plain.state_dict().items()},
            "weights": {k: v.detach().clone() for k, v in hub.state_dict().items() if _is_adapter_param(k)},
            "inputs": make_inputs(spec)}


def run_exported(case: dict, dtype: torch.dtype = torch.float64) -> dict:
    """Rebuild the plain model here, load the exported weights, run plain and hook reference."""
    spec = FAMILIES[case["family"]]
    model = make_plain(spec)
    missing, unexpected = model.load_state_dict(convert_plain_state(spec.name, case["plain_state"]), strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"{spec.name}: weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(dtype).eval()
    plain_out = run_with_grads(model, spec, case["inputs"])
    ref = HookReference(model, spec, case["weights"], case["variant"])
    try:
        ref_out = run_with_grads(model, spec, case["inputs"])
    finally:
        ref.remove()
    return {"plain": plain_out.__dict__, "reference": ref_out.__dict__, "transformers": transformers.__version__}


if __name__ == "__main__":
    # python tests/families.py IN.pt OUT.pt : run exported cases with this interpreter's transformers
    import sys

    torch.set_num_threads(int(os.environ.get("AFKERN_FAMILIES_THREADS", "1")))
    cases = torch.load(sys.argv[1], weights_only=False)
    torch.save([run_exported(c) for c in cases], sys.argv[2])
