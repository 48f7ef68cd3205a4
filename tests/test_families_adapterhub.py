"""Parity of afkern with AdapterHub's `adapters` 1.3.0 (transformers 4.57), for every family and
placement of the oracle harness (tests/families.py: tiny random models, three adapters, a dynamic
Fuse, non-degenerate weights), through every door: ``from_adapterhub`` on the `adapters` model,
``load_adapterhub`` of the directories `adapters` saved, and `adapters` loading what
``save_adapterhub`` wrote.

Judges (issue 11): float64 last hidden state and input gradients equal to 1e-9 relative; float32
error against the float64 truth at most twice AdapterHub's own float32 error (training path and
folded inference); greedy ``generate()`` with the KV cache gives AdapterHub's tokens (and scores).
"""

import copy
import os
import sys
from functools import lru_cache

import pytest
import torch

adapters = pytest.importorskip("adapters")
from adapters import Fuse  # noqa: E402

import afkern  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import families as F  # noqa: E402
from parity import judge  # noqa: E402

CASES = [(name, v) for name, spec in F.FAMILIES.items() for v in F.variants(spec)]
IDS = [f"{n}-{v}" for n, v in CASES]
NAMES = list(F.ADAPTER_NAMES)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@lru_cache(maxsize=None)
def _built(name, variant):
    spec, plain, hub = F.build(name, variant)
    return spec, plain, hub, F.adapterhub_outputs(hub, spec, torch.float64), F.adapterhub_outputs(hub, spec, torch.float32)


def _save_hub(hub, folder):
    os.makedirs(folder, exist_ok=True)
    for n in NAMES:
        hub.save_adapter(os.path.join(folder, n), n)
    hub.save_adapter_fusion(os.path.join(folder, "fusion"), Fuse(*NAMES))
    return [os.path.join(folder, n) for n in NAMES], os.path.join(folder, "fusion")


def _grads(out):
    return list(out.embed_grads) + ([out.pixel_grad] if out.pixel_grad is not None else [])


def _check(model, spec, o64, o32, what):
    """float64 to 1e-9; float32 (training path and folded inference) within 2x AdapterHub's error."""
    inputs = F.make_inputs(spec)
    m64 = copy.deepcopy(model).double()
    a64 = F.run_with_grads(m64, spec, inputs)
    assert F.rel_err(a64.hidden, o64.hidden) < 1e-9, what
    for g, w in zip(_grads(a64), _grads(o64)):
        assert F.rel_err(g, w) < 1e-9, (what, "grad")
    a32 = F.run_with_grads(model, spec, inputs)
    assert F.rel_err(a32.hidden, o64.hidden) <= 2 * F.rel_err(o32.hidden, o64.hidden), what
    for g, g32, w in zip(_grads(a32), _grads(o32), _grads(o64)):
        assert F.rel_err(g, w) <= 2 * F.rel_err(g32, w), (what, "grad")
    with torch.no_grad():
        inf = model(**F.cast_inputs(inputs, torch.float32)).last_hidden_state  # folded weights
    assert F.rel_err(inf, o64.hidden) <= 2 * F.rel_err(o32.hidden, o64.hidden), (what, "folded")


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_matches_adapterhub_both_ways(name, variant, tmp_path):
    spec, plain, hub, o64, o32 = _built(name, variant)
    # 1. from_adapterhub on the `adapters` model (left as it was)
    keys = sorted(hub.state_dict())
    conv = afkern.from_adapterhub(hub, backend="torch")
    assert type(conv).__name__ == spec.model_class and sorted(hub.state_dict()) == keys
    n_sites = sum(len(F._get(plain, s.layers)) for s in F.active_sites(spec, variant))
    assert len(list(afkern.fused_blocks(conv))) == n_sites
    _check(conv, spec, o64, o32, "from_adapterhub")
    # 2. load_adapterhub of the directories AdapterHub saved
    dirs, fusion = _save_hub(hub, str(tmp_path / "hub"))
    loaded = copy.deepcopy(plain)
    afkern.load_adapterhub(loaded, dirs, fusion, backend="torch")
    _check(loaded, spec, o64, o32, "load_adapterhub")
    # 3. AdapterHub loads what afkern saved: the same outputs
    written = afkern.save_adapterhub(loaded, str(tmp_path / "afkern"))
    fresh = copy.deepcopy(plain).float()
    adapters.init(fresh)
    F.zero_added_base_params_(fresh, plain)
    for n in NAMES:
        fresh.load_adapter(written[n])
    fresh.load_adapter_fusion(written["a,b,c"], set_active=True)
    fresh.eval()
    inputs = F.make_inputs(spec)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).last_hidden_state, hub(**inputs).last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["seq_bn", "double_seq_bn", "seq_bn_cross"])
def test_bart_training_mode_matches_adapterhub(variant):
    """BART applies its adapters to the *dropped-out* sub-layer output (functional dropout inside
    the layer's forward); afkern moves that dropout into the site's tap (same call, same RNG
    stream), so training mode equals AdapterHub's with the same seed, float64 to 1e-9."""
    import transformers

    spec = F.FAMILIES["bart"]
    cfg = spec.make_config()
    cfg.dropout = cfg.activation_dropout = 0.1
    torch.manual_seed(0)
    plain = transformers.BartModel(cfg).eval()
    hub = F.make_adapterhub(spec, variant, plain=plain)
    conv = afkern.from_adapterhub(hub, backend="torch")
    hub64, conv64 = copy.deepcopy(hub).double().train(), copy.deepcopy(conv).double().train()
    inputs = F.make_inputs(spec)
    torch.manual_seed(5)
    a = F.run_with_grads(hub64, spec, inputs)
    torch.manual_seed(5)
    b = F.run_with_grads(conv64, spec, inputs)
    assert F.rel_err(b.hidden, a.hidden) < 1e-9 and F.rel_err(b.encoder_hidden, a.encoder_hidden) < 1e-9
    for g, w in zip(b.embed_grads, a.embed_grads):
        assert F.rel_err(g, w) < 1e-9
    hub64.eval()
    assert F.rel_err(F.run_with_grads(hub64, spec, inputs).hidden, a.hidden) > 1e-2  # dropout was on


def test_albert_temperature_anneals_per_call():
    """ALBERT's shared layer calls its fusion num_hidden_layers times per forward; AdapterHub
    anneals the temperature at every call, and so does afkern."""
    spec = F.FAMILIES["albert"]
    plain = F.make_plain(spec)
    hub = copy.deepcopy(plain)
    adapters.init(hub)
    for n in NAMES:
        hub.add_adapter(n, config=F.adapter_config("seq_bn"))
    hub.add_adapter_fusion(Fuse(*NAMES), adapters.DynamicAdapterFusionConfig(temperature=True))
    hub.set_active_adapters(Fuse(*NAMES))
    F.perturb_adapterhub_(hub.eval())
    conv = afkern.from_adapterhub(hub, backend="torch").double()
    hub.double()
    inputs = F.make_inputs(spec)
    with torch.no_grad():
        for _ in range(3):
            assert F.rel_err(conv(**inputs).last_hidden_state, hub(**inputs).last_hidden_state) < 1e-9
    fl = hub.encoder.albert_layer_groups[0].albert_layers[0].output_adapters.adapter_fusion_layer["a,b,c"]
    (blk,) = [b for _, b in afkern.fused_blocks(conv)]
    assert blk.temperature == pytest.approx(fl.T) and fl.T == pytest.approx(50 - 9 * 0.05)


@pytest.mark.parametrize("name,head", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"),
                                       ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_generate_with_kv_cache_matches_adapterhub(name, head, tmp_path):
    """Greedy generate() with the KV cache: AdapterHub's tokens and, at every step, its scores.

    AdapterHub 1.3.0's own Llama and Mistral attention (adapters/models/llama) takes
    ``past_key_value`` while transformers 4.57 passes ``past_key_values``: its cache is never
    filled, so its *cached* decoding differs from its own uncached forward (even with no adapter
    active). afkern runs the plain transformers model, whose cache works; it is compared with
    AdapterHub's uncached generation (the function AdapterHub's model defines) for every family,
    and with AdapterHub's cached one where that works (GPT-2, Qwen2)."""
    import transformers

    spec = F.FAMILIES[name]
    torch.manual_seed(0)
    lm = getattr(transformers, head)(spec.make_config()).eval()
    hub = F.make_adapterhub(spec, "double_seq_bn", plain=lm)
    assert hub._afkern_zeroed == []  # nothing of the base model changed: the same function as lm
    dirs, fusion = _save_hub(hub, str(tmp_path))
    model = copy.deepcopy(lm)
    afkern.load_adapterhub(model, dirs, fusion, backend="torch")
    ids = torch.randint(F.FIRST_ID, F.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
              return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        got = model.generate(ids, use_cache=True, **kw)
        wants = [hub.generate(ids, use_cache=False, **kw)]
        if name in ("gpt2", "qwen2"):
            wants.append(hub.generate(ids, use_cache=True, **kw))
        base = lm.generate(ids, use_cache=True, **kw)
        truth = copy.deepcopy(hub).double().generate(ids, use_cache=False, **kw)  # AdapterHub in float64
    assert torch.equal(got.sequences, truth.sequences)
    for want in wants:
        assert torch.equal(got.sequences, want.sequences)
        for i, (s_got, s_want, s_true) in enumerate(zip(got.scores, want.scores, truth.scores)):  # every decoding step
            judge(f"{name} generate, step {i} scores", s_got, s_want, s_true)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(got.scores, base.scores))


@pytest.mark.parametrize("name,variant,options", [
    ("gpt2", "double_seq_bn", dict(static=True)),
    ("t5", "seq_bn", dict(residual_before=True, query_before_ln=True)),
    ("distilbert", "double_seq_bn", dict(residual_before=True)),
    ("vit", "seq_bn", dict(static=True, query_before_ln=True)),
])
def test_fusion_options_match_adapterhub(name, variant, options):
    """The fusion's own options are site-independent: static fusion, residual_before and
    query_before_ln at hooked sites, with and without a norm."""
    spec = F.FAMILIES[name]
    plain = F.make_plain(spec)
    hub = copy.deepcopy(plain)
    adapters.init(hub)
    for n in NAMES:
        hub.add_adapter(n, config=F.adapter_config(variant))
    static = options.pop("static", False)
    fcfg = (adapters.StaticAdapterFusionConfig if static else adapters.DynamicAdapterFusionConfig)(**options)
    hub.add_adapter_fusion(Fuse(*NAMES), fcfg)
    hub.set_active_adapters(Fuse(*NAMES))
    F.perturb_adapterhub_(hub.eval())
    F.calibrate_fusion_(hub, spec, F.make_inputs(spec))
    o64, o32 = F.adapterhub_outputs(hub, spec, torch.float64), F.adapterhub_outputs(hub, spec, torch.float32)
    conv = afkern.from_adapterhub(hub, backend="torch")
    assert all((b.value is None) == static for _, b in afkern.fused_blocks(conv))
    _check(conv, spec, o64, o32, "from_adapterhub")


# model types the site table covers with another family's entry (PLBart: BART's, mT5: T5's),
# built like the harness's families
EXTRA = {
    "plbart": F.FamilySpec(
        "plbart", "PLBartModel",
        lambda: F._cfg("PLBartConfig", vocab_size=F.VOCAB, d_model=F.HIDDEN, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=F.HEADS, decoder_attention_heads=F.HEADS, encoder_ffn_dim=F.INTER,
                       decoder_ffn_dim=F.INTER, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                       eos_token_id=2, decoder_start_token_id=2),
        "encoder-decoder", F._BART_SITES, supports_cross=True),
    "mt5": F.FamilySpec(
        "mt5", "MT5Model",
        lambda: F._cfg("MT5Config", vocab_size=F.VOCAB, d_model=F.HIDDEN, d_kv=10, d_ff=F.INTER, num_layers=2,
                       num_decoder_layers=2, num_heads=F.HEADS, relative_attention_num_buckets=8,
                       relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
        "encoder-decoder", F._T5_SITES, supports_cross=True),
}


@pytest.mark.parametrize("name,variant", [(n, v) for n in EXTRA for v in ("double_seq_bn", "seq_bn_cross")])
def test_plbart_and_mt5_match_adapterhub(name, variant, tmp_path):
    spec = EXTRA[name]
    plain = F.make_plain(spec)
    hub = F.make_adapterhub(spec, variant, plain=plain)
    o64, o32 = F.adapterhub_outputs(hub, spec, torch.float64), F.adapterhub_outputs(hub, spec, torch.float32)
    _check(afkern.from_adapterhub(hub, backend="torch"), spec, o64, o32, "from_adapterhub")
    dirs, fusion = _save_hub(hub, str(tmp_path))
    loaded = afkern.load_adapterhub(copy.deepcopy(plain), dirs, fusion, backend="torch")
    _check(loaded, spec, o64, o32, "load_adapterhub")


def test_deberta_with_adapterhubs_random_in_proj_bias_is_refused():
    """`adapters.init` gives DeBERTa v1's bias-free in_proj a random bias the plain model cannot
    hold: from_adapterhub refuses, explains, and says how to zero it; zeroed, it converts."""
    spec = F.FAMILIES["deberta"]
    plain = F.make_plain(spec)
    hub = copy.deepcopy(plain)
    adapters.init(hub)
    for n in NAMES:
        hub.add_adapter(n, config=F.adapter_config("seq_bn"))
    hub.add_adapter_fusion(Fuse(*NAMES))
    hub.set_active_adapters(Fuse(*NAMES))
    keys = sorted(hub.state_dict())
    with pytest.raises(ValueError, match=r"in_proj\.bias(.|\n)*zero it first"):
        afkern.from_adapterhub(hub)
    assert sorted(hub.state_dict()) == keys
    F.zero_added_base_params_(hub, plain)
    assert len(list(afkern.fused_blocks(afkern.from_adapterhub(hub)))) == 2


def test_adapterhub_model_of_an_unsupported_family_is_refused():
    import transformers

    torch.manual_seed(0)
    gptj = transformers.GPTJModel(transformers.GPTJConfig(n_embd=40, n_layer=1, n_head=4, rotary_dim=8, vocab_size=99,
                                                          n_positions=64)).eval()
    adapters.init(gptj)
    for n in NAMES:
        gptj.add_adapter(n, config="seq_bn")
    gptj.add_adapter_fusion(Fuse(*NAMES))
    gptj.set_active_adapters(Fuse(*NAMES))
    keys = sorted(gptj.state_dict())
    with pytest.raises(TypeError, match=r"gptj(.|\n)*GPT-2(.|\n)*Llama"):
        afkern.from_adapterhub(gptj)
    assert sorted(gptj.state_dict()) == keys
