"""The models a benchmark case runs, built per model *family*, all with identical weights.

For a family (``--family``: ``bert``, ``gpt2``, ``llama``) and a number N of fused adapters, :class:`Setup` builds

* ``am``: AdapterHub's model, ``adapters.init(base model)`` with N ``SeqBnConfig`` adapters
  (reduction factor from :class:`BenchShape`) and an active ``Fuse(task0, ..., task{N-1})``
  (``None`` when ``adapters`` does not import);
* ``fm``: afkern's model, ``afkern.from_adapterhub(am, backend="reference")`` -- the same weights
  (without ``adapters``: the family's afkern patcher on a fresh model, AdapterHub's initialisation);
* ``pm``: the plain base model without adapters, carrying every weight the two share.

Adapter and fusion weights are then perturbed (:func:`perturb`): the initialisations give a
fusion softmax p ~ 1/N, under which a wrong score path would go unseen by the correctness guard.
Query/key weights get std ``0.05 * sqrt(64 / d)`` (scores grow like d * std_q * std_k, so this
keeps the softmax peaked but not one-hot), other adapter weights 0.05, biases 0.02; the value
matrix gets 0.01 on top of its near-identity init. BERT's own weights are never touched.

Every model is in ``eval()`` mode (dropout off, one deterministic function) with every weight
frozen except the fusions' query, key and value: fusion training, the workload of the benchmarks'
gradient modes.

A :class:`Family` says how to build and drive one architecture (config builder, model class,
where the fused site sits, how to call a layer); afkern places its blocks in any family of its site
table (``afkern.families``), so a new benchmark family is one more entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["BenchShape", "Family", "FAMILIES", "get_family", "Setup", "perturb", "adapters_available"]


@dataclass(frozen=True)
class BenchShape:
    """Model width. Defaults: BERT-base (d=768, intermediate 3072, 12 heads), r = d / 16 = 48."""

    hidden: int = 768
    intermediate: int = 3072
    heads: int = 12
    reduction_factor: int = 16

    @property
    def bottleneck(self) -> int:
        return self.hidden // self.reduction_factor

    def validate(self) -> None:
        """Raise ``ValueError`` (naming the CLI options) for a width no model can have."""
        if self.hidden % self.heads:
            raise ValueError(f"--hidden-size {self.hidden} must be a multiple of --heads {self.heads}")
        if self.hidden % self.reduction_factor:
            raise ValueError(f"--hidden-size {self.hidden} must be a multiple of --reduction-factor {self.reduction_factor}")


@dataclass(frozen=True)
class Family:
    """How the benchmark builds and drives one model family.

    ``config(shape, layers, seq_len)`` -> a transformers config; ``model(config)`` -> a randomly
    initialised base model (``model(inputs_embeds=[B, S, d]).last_hidden_state`` -> [B, S, d]);
    ``patch(model, names, backend)`` -> that model with afkern's fused blocks (used only when
    ``adapters`` is missing); ``layers(model)`` -> its transformer layers; ``site(layer)`` -> the
    module of a layer where the adapters and the fusion sit (AdapterHub's
    ``adapter_fusion_layer`` lives in it; afkern puts its ``FusedAdapterBlock`` there), called as
    ``site(hidden_states [B, S, block_in[0]], input_tensor [B, S, block_in[1]]) -> [B, S, d]``;
    ``block_in(shape)`` -> those two input widths; ``call_layer(layer, x [B, S, d])`` -> one plain
    layer's output [B, S, d]."""

    name: str
    config: Callable[[BenchShape, int, int], Any]
    model: Callable[[Any], nn.Module]
    patch: Callable[[nn.Module, List[str], str], nn.Module]
    layers: Callable[[nn.Module], Sequence[nn.Module]]
    site: Callable[[nn.Module], nn.Module]
    block_in: Callable[[BenchShape], Tuple[int, int]]
    call_layer: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    description: str = ""


def _bert_config(shape: BenchShape, layers: int, seq_len: int):
    from transformers import BertConfig

    shape.validate()
    return BertConfig(
        vocab_size=128,  # inputs are embeddings; a small vocabulary keeps memory and build time down
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
        num_attention_heads=shape.heads, max_position_embeddings=max(512, seq_len),
    )


def _bert_model(config) -> nn.Module:
    from transformers import BertModel

    return BertModel(config)


def _bert_patch(model: nn.Module, names: List[str], backend: str) -> nn.Module:
    import afkern

    return afkern.patch_bert(model, names, backend=backend)


def _first(out) -> torch.Tensor:
    """The hidden states of a layer's output (a tensor, or a tuple whose first item is one)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _decoder_config(cls_name: str):
    """GPT-2 / Llama-style decoders at the BenchShape's width (no KV cache: one forward per call)."""
    def build(shape: BenchShape, layers: int, seq_len: int):
        import transformers

        shape.validate()
        pos = max(512, seq_len)
        if cls_name == "GPT2Config":
            return transformers.GPT2Config(vocab_size=128, n_embd=shape.hidden, n_layer=layers, n_head=shape.heads,
                                           n_inner=shape.intermediate, n_positions=pos, use_cache=False)
        # SwiGLU has three d x I maps: I = 2/3 of BERT's keeps the feed-forward FLOPs of BERT-base
        return transformers.LlamaConfig(vocab_size=128, hidden_size=shape.hidden, num_hidden_layers=layers,
                                        num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                                        intermediate_size=2 * shape.intermediate // 3, max_position_embeddings=pos,
                                        use_cache=False)
    return build


def _model_of(cls_name: str) -> Callable[[Any], nn.Module]:
    def build(config) -> nn.Module:
        import transformers

        return getattr(transformers, cls_name)(config)
    return build


def _patch_any(model: nn.Module, names: List[str], backend: str) -> nn.Module:
    import afkern

    return afkern.patch_model(model, names, backend=backend)


class _Add(nn.Module):
    """The plain model's residual add at a pre-LN output site (no adapters): ``h + residual``."""

    def forward(self, hidden_states, input_tensor):
        return hidden_states + input_tensor


class _HubSite(nn.Module):
    """AdapterHub's output site of a pre-LN layer, called as ``(h, residual)``: its
    ``bottleneck_layer_forward(h, residual, None)`` (norm-free)."""

    def __init__(self, bottleneck: nn.Module):
        super().__init__()
        self.bottleneck = bottleneck

    @property
    def adapter_fusion_layer(self):
        return self.bottleneck.adapter_fusion_layer

    def forward(self, hidden_states, input_tensor):
        return self.bottleneck(hidden_states, input_tensor, None)


def _pre_ln_site(layer: nn.Module) -> nn.Module:
    """The output site of a GPT-2 / Llama layer: afkern's block (``afkern_output``), AdapterHub's
    ``output_adapters``, or the plain residual add."""
    if "afkern_output" in layer._modules:
        return layer.afkern_output
    if hasattr(layer, "output_adapters"):
        return _HubSite(layer.output_adapters)
    return _Add()


def _llama_layer_call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One Llama layer alone: it takes the rotary position embeddings from the model."""
    rope = layer.__dict__.get("_bench_rope")
    if rope is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope = layer.__dict__["_bench_rope"] = LlamaRotaryEmbedding(layer.self_attn.config).to(x.device)
    pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    return _first(layer(x, position_embeddings=rope(x, pos)))


FAMILIES: Dict[str, Family] = {
    "bert": Family(
        "bert", _bert_config, _bert_model, _bert_patch,
        layers=lambda m: m.encoder.layer,
        site=lambda layer: layer.output,  # BertOutput: dense + dropout + adapters + fusion + LayerNorm
        block_in=lambda s: (s.intermediate, s.hidden),
        call_layer=lambda layer, x: _first(layer(x)),
        description="BERT encoder; the fusion after each layer's feed-forward (BertOutput)",
    ),
    "gpt2": Family(
        "gpt2", _decoder_config("GPT2Config"), _model_of("GPT2Model"), _patch_any,
        layers=lambda m: m.h, site=_pre_ln_site, block_in=lambda s: (s.hidden, s.hidden),
        call_layer=lambda layer, x: _first(layer(x)),
        description="GPT-2 decoder (pre-LN); the fusion after each layer's MLP (norm-free site, hooks)",
    ),
    "llama": Family(
        "llama", _decoder_config("LlamaConfig"), _model_of("LlamaModel"), _patch_any,
        layers=lambda m: m.layers, site=_pre_ln_site, block_in=lambda s: (s.hidden, s.hidden),
        call_layer=_llama_layer_call,
        description="Llama-style decoder (RMSNorm, SwiGLU with I = 2/3 of BERT's, RoPE); the fusion after each "
                    "layer's MLP (norm-free site, hooks)",
    ),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}") from None


def adapters_available() -> Tuple[bool, str]:
    try:
        import adapters  # noqa: F401
    except Exception as exc:
        return False, f"the adapters package is not importable ({exc}); pip install adapters"
    return True, "ok"


# AdapterHub's parameter names (the same in every family adapters supports).
_HUB_ADAPTER = re.compile(r"\.adapters\.[^.]+\.adapter_(down|up)\.")
_HUB_QK = re.compile(r"\.adapter_fusion_layer\.[^.]+\.(query|key)\.")
_HUB_V = re.compile(r"\.adapter_fusion_layer\.[^.]+\.value\.")
# afkern's, relative to a FusedAdapterBlock.
_AF_ADAPTER = re.compile(r"^(down|up)_(weight|bias)$")
_AF_QK = re.compile(r"^(query|key)\.")
_AF_V = re.compile(r"^value\.")


def _role(name: str, blocks: Sequence[str]) -> str:
    """``"adapter"``, ``"qk"``, ``"v"`` or ``""`` (not an adapter/fusion weight) for a parameter name."""
    for pat, role in ((_HUB_ADAPTER, "adapter"), (_HUB_QK, "qk"), (_HUB_V, "v")):
        if pat.search(name):
            return role
    for b in blocks:
        if name.startswith(b + "."):
            rest = name[len(b) + 1:]
            for pat, role in ((_AF_ADAPTER, "adapter"), (_AF_QK, "qk"), (_AF_V, "v")):
                if pat.search(rest):
                    return role
    return ""


@torch.no_grad()
def perturb(module: nn.Module, generator: torch.Generator) -> None:
    """Adapter and fusion weights of ``module`` (AdapterHub's or afkern's) set as the module doc
    says. One draw per parameter, in ``named_parameters`` order, whatever its role, so the weights
    do not depend on which parameters are perturbed."""
    import afkern

    blocks = [n for n, _ in afkern.fused_blocks(module)]
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=generator).to(p)
        role = _role(name, blocks)
        if role == "qk" and p.dim() > 1:
            p.copy_(noise * 0.05 * (64.0 / p.shape[-1]) ** 0.5)
        elif role in ("adapter", "qk"):
            p.copy_(noise * (0.05 if p.dim() > 1 else 0.02))
        elif role == "v":
            p.add_(noise * 0.01)


def freeze_except_fusion(model: nn.Module) -> None:
    """Every weight frozen except the fusions' query, key and value (AdapterHub's and afkern's)."""
    import afkern

    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, afkern.FusedAdapterBlock):
            for lin in (m.query, m.key, m.value):
                if lin is not None:
                    for p in lin.parameters():
                        p.requires_grad_(True)
        fl = getattr(m, "adapter_fusion_layer", None)
        if isinstance(fl, nn.ModuleDict):
            for p in fl.parameters():
                p.requires_grad_(True)


class Setup:
    """The models of one benchmark point (family, N, layers) with identical weights: ``am``,
    ``fm``, ``pm`` as the module doc says, on ``device`` in ``dtype``, ``eval()`` mode."""

    def __init__(self, shape: BenchShape, n: int, layers: int, seq_len: int, device, dtype, seed: int = 0,
                 family: str = "bert"):
        import afkern

        self.family = get_family(family)
        self.shape, self.n, self.layers, self.device, self.dtype = shape, n, layers, torch.device(device), dtype
        self.names = [f"task{i}" for i in range(n)]
        gen = torch.Generator().manual_seed(seed + 1000 * n + layers)
        torch.manual_seed(seed)
        config = self.family.config(shape, layers, seq_len)
        ok, self.adapters_reason = adapters_available()
        self.am, self.fusion_name = None, None
        if ok:
            import adapters
            from adapters import SeqBnConfig
            from adapters.composition import Fuse

            am = self.family.model(config)
            adapters.init(am)
            for name in self.names:
                am.add_adapter(name, config=SeqBnConfig(reduction_factor=shape.reduction_factor))
            fuse = Fuse(*self.names)
            am.add_adapter_fusion(fuse)
            am.set_active_adapters(fuse)
            perturb(am, gen)
            am.eval()
            fm = afkern.from_adapterhub(am, backend="reference")
            self.am = am.to(device=self.device, dtype=dtype)
            self.fusion_name = fuse.name
        else:  # afkern alone: AdapterHub's initialisation through the family's patcher, same perturbation
            fm = self.family.patch(self.family.model(config), self.names, "reference")
            perturb(fm, gen)
        pm = self.family.model(config)
        src = self.am if self.am is not None else fm
        # the shared weights by name; the adapters' and the fusions' are the unexpected keys
        missing, _ = pm.load_state_dict(src.state_dict(), strict=False)
        if missing:
            raise RuntimeError(f"the plain {self.family.name} model lacks weights of the adapted one: {missing[:5]}")
        self.fm = fm.to(device=self.device, dtype=dtype).eval()
        self.pm = pm.to(device=self.device, dtype=dtype).eval()
        for m in (self.am, self.fm, self.pm):
            if m is not None:
                freeze_except_fusion(m)

    def site(self, model: nn.Module, layer: int = 0) -> nn.Module:
        """The fused site (AdapterHub's or afkern's; the plain module for ``pm``) of one layer."""
        return self.family.site(self.family.layers(model)[layer])
