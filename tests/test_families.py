"""Every family of the site table (afkern/families.py): patching, the hooks, AdapterHub-directory
round trips and bad input, without AdapterHub's `adapters` package.

Runs on transformers 4.57 (make test) and 5.x (scripts/test_tf5.sh) with the tiny models of the
oracle harness (tests/families.py). Parity with `adapters` itself: tests/test_families_adapterhub.py
(4.57) and tests/test_families_tf5.py (5.x against references made on 4.57).
"""

import copy
import io
import json
import os
import sys

import pytest
import torch

import afkern
from afkern.families import FAMILIES as TABLE, family_of
from afkern.sites import layer_hooks, remove_sites

sys.path.insert(0, os.path.dirname(__file__))
import families as F  # noqa: E402
from parity import assert_2x_all, f64_step, f64_truth, judge  # noqa: E402

NAMES = list(F.ADAPTER_NAMES)
PLACEMENTS = {"pfeiffer": afkern.AdapterConfig(reduction_factor=F.REDUCTION),
              "houlsby": afkern.AdapterConfig.houlsby(reduction_factor=F.REDUCTION),
              "cross": afkern.AdapterConfig(reduction_factor=F.REDUCTION, cross_adapter=True)}
CASES = [(n, p) for n, spec in F.FAMILIES.items() for p in ("pfeiffer", "houlsby") + (("cross",) if spec.supports_cross else ())]
VARIANT = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "cross": "seq_bn_cross"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def _perturb(model, seed=0):
    """O(1) adapter and fusion weights (AdapterHub's init gives p ~ 1/N and near-zero adapters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in afkern.fused_blocks(model):
            for n, p in b.named_parameters():
                if n.startswith(("dense.", "LayerNorm.")):
                    continue
                d = p.shape[-1]
                if n.endswith("value.weight"):
                    p.copy_(torch.eye(d) + torch.randn(p.shape, generator=g).to(p.dtype) * 0.15 / d ** 0.5)
                elif p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * (1.5 / d ** 0.5))
                else:
                    p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)
    return model


def _patched(name, placement, dtype=torch.float64, backend="torch", seed=0):
    spec = F.FAMILIES[name]
    model = F.make_plain(spec).to(dtype)
    afkern.patch_model(model, NAMES, PLACEMENTS[placement], "dynamic", backend=backend)
    return spec, _perturb(model, seed)


def _site_count(spec, placement):
    """Blocks AdapterHub's placement gives (the harness's executable table for this transformers)."""
    locs = {s.location for s in F.active_sites(spec, VARIANT[placement])}
    plain = F.make_plain(spec)
    return sum(len(F._get(plain, h.layers)) for h in F.hook_sites(spec.name) if h.location in locs)


def _snapshot(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()], sorted(model.state_dict()),
            [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()])


# ---------------------------------------------------------------------------------------------
# placement: every family, every placement, fused torch path against the reference backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,placement", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_patch_matches_reference_backend(name, placement):
    """float64: the torch path (training and folded inference) equals the naive reference, in the
    last hidden state and the gradients of the embeddings and of every adapter and fusion tensor;
    the adapters change the output; the base model's state_dict keys are unchanged."""
    spec, model = _patched(name, placement)
    plain = F.make_plain(spec).double()
    assert family_of(model) is TABLE[name]
    blocks = list(afkern.fused_blocks(model))
    assert len(blocks) == _site_count(spec, placement)
    new_keys = set(model.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(model.state_dict())
    assert all(".afkern_" in k or (TABLE[name].kind == "swap" and any(k.startswith(b + ".") for b, _ in blocks))
               for k in new_keys)
    ref = copy.deepcopy(model)
    afkern.set_backend(ref, "reference")
    inputs = F.make_inputs(spec)
    a, b = F.run_with_grads(model, spec, inputs), F.run_with_grads(ref, spec, inputs)
    assert F.rel_err(a.hidden, b.hidden) < 1e-9
    for x, y in zip(a.embed_grads, b.embed_grads):
        assert F.rel_err(x, y) < 1e-9
    n = 0
    refp = dict(ref.named_parameters())
    for k, p in model.named_parameters():
        q = refp[k]
        if ".afkern_" not in k and not any(s in k for s in ("down_", "up_", "fusions.")):
            continue
        if q.grad is None or q.grad.abs().max() < 1e-10:  # key bias: cancels in the softmax
            assert p.grad is None or p.grad.abs().max() < 1e-10, k
            continue
        assert F.rel_err(p.grad, q.grad) < 1e-8, k
        n += 1
    assert n >= 6 * len(blocks)
    assert F.rel_err(a.hidden, F.run_with_grads(plain, spec, inputs).hidden) > 1e-2
    with torch.no_grad():  # folded inference weights
        out = model(**F.cast_inputs(inputs, torch.float64)).last_hidden_state
    assert F.rel_err(out, b.hidden) < 1e-9


@pytest.mark.parametrize("name", ["bart", "t5", "gpt2"])
def test_training_mode_matches_reference_backend(name):
    """Training mode with the models' own dropout on (BART: the layer's functional dropout, moved
    into the site's tap): the same RNG stream gives the same function on both backends."""
    spec = F.FAMILIES[name]
    config = spec.make_config()
    for attr in ("dropout", "dropout_rate", "resid_pdrop", "hidden_dropout_prob"):
        if hasattr(config, attr):
            setattr(config, attr, 0.1)
    torch.manual_seed(0)
    import transformers

    model = getattr(transformers, spec.model_class)(config, **spec.model_kwargs).double()
    afkern.patch_model(model, NAMES, PLACEMENTS["houlsby"], "dynamic", backend="torch")
    _perturb(model)
    ref = copy.deepcopy(model)
    afkern.set_backend(ref, "reference")
    inputs = F.make_inputs(spec)
    outs = []
    for m in (model, ref, model):
        m.train()
        torch.manual_seed(3)
        outs.append(F.run_with_grads(m, spec, inputs))
    assert F.rel_err(outs[0].hidden, outs[1].hidden) < 1e-9
    assert F.rel_err(outs[0].embed_grads[0], outs[1].embed_grads[0]) < 1e-9
    model.eval()
    assert F.rel_err(F.run_with_grads(model, spec, inputs).hidden, outs[0].hidden) > 1e-3  # dropout was on
    if name == "bart":
        hooks = dict(layer_hooks(model))
        assert all(lh.dropout_rate == 0.1 and lh.layer.dropout == 0.0 for lh in hooks.values())


def test_every_priority_family_has_an_entry():
    for name in F.PRIORITY + ("bert",):
        assert name in TABLE, name
        spec = F.FAMILIES[name]
        fam = TABLE[name]
        assert set(fam.locations()) >= {"mh_adapter", "output_adapter"}
        assert ("cross_adapter" in fam.locations()) == spec.supports_cross


# ---------------------------------------------------------------------------------------------
# AdapterHub directories: afkern -> afkern, keys as AdapterHub writes them
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(F.FAMILIES))
def test_save_load_round_trip_with_adapterhub_keys(name, tmp_path):
    spec = F.FAMILIES[name]
    placement = "cross" if spec.supports_cross else "houlsby"
    _, model = _patched(name, placement, dtype=torch.float32)
    written = afkern.save_adapterhub(model, str(tmp_path), safe_serialization=False)
    keys = {n: sorted(torch.load(os.path.join(written[n], f), weights_only=True))
            for n, f in (("a", "pytorch_adapter.bin"), ("a,b,c", "pytorch_model_adapter_fusion.bin"))}
    want = F.expected_key_patterns(spec, VARIANT[placement])
    # keys carry the base_model_prefix, which AdapterHub's head classes need (issue 20)
    bp = model.base_model_prefix + "."
    assert all(k.startswith(bp) for ks in keys.values() for k in ks)
    assert sorted({F.normalise_key(k[len(bp):]) for k in keys["a"]}) == want["adapter"]
    assert sorted({F.normalise_key(k[len(bp):]) for k in keys["a,b,c"]}) == want["fusion"]
    cfg = json.load(open(os.path.join(written["a"], "adapter_config.json")))
    assert cfg["config"]["cross_adapter"] == (placement == "cross")
    fresh = F.make_plain(spec)  # the same base weights (seeded)
    afkern.load_adapterhub(fresh, [written[n] for n in NAMES], written["a,b,c"])
    inputs = F.make_inputs(spec)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                                   atol=0, rtol=0)


@pytest.mark.parametrize("name,head", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"),
                                       ("t5", "T5ForConditionalGeneration"), ("vit", "ViTForImageClassification")])
def test_head_models_save_with_prefix_and_load_bare(name, head, tmp_path):
    """A model with a head saves AdapterHub's keys with its base-model prefix (T5's too, although
    T5ForConditionalGeneration is its own base model); the bare model loads them."""
    import transformers

    spec = F.FAMILIES[name]
    torch.manual_seed(0)
    lm = getattr(transformers, head)(spec.make_config()).eval()
    afkern.patch_model(lm, NAMES, PLACEMENTS["houlsby"])
    _perturb(lm)
    written = afkern.save_adapterhub(lm, str(tmp_path), safe_serialization=True)
    from safetensors.torch import load_file

    keys = list(load_file(os.path.join(written["a"], "adapter.safetensors")))
    starts = {"gpt2": ("transformer.h.",), "llama": ("model.layers.",), "t5": ("transformer.encoder.block.", "transformer.decoder.block."),
              "vit": ("vit.encoder.layer.",)}[name]
    assert all(k.startswith(starts) for k in keys), keys[:2]
    bare = F.make_plain(spec)
    bare.load_state_dict(lm.base_model.state_dict(), strict=False)
    afkern.load_adapterhub(bare, [written[n] for n in NAMES], written["a,b,c"])
    inputs = F.make_inputs(spec)

    def hidden(m):
        out = m(**inputs, output_hidden_states=True)
        return (out.decoder_hidden_states if name == "t5" else out.hidden_states)[-1]

    with torch.no_grad():
        torch.testing.assert_close(hidden(bare), hidden(lm), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# the hooks: deepcopy, state_dict, pickling, .to(), removal, torch.compile, checkpointing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "bart", "albert", "vit"])
def test_hooks_survive_copy_state_dict_pickle_and_to(name):
    spec, model = _patched(name, "houlsby", dtype=torch.float32)
    inputs = F.make_inputs(spec)
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        cp = copy.deepcopy(model)  # the copy's hooks drive the copy's blocks
        torch.testing.assert_close(cp(**inputs).last_hidden_state, want, atol=0, rtol=0)
        for _, b in afkern.fused_blocks(cp):
            b.up_bias.add_(1.0)
        assert (cp(**inputs).last_hidden_state - want).abs().max() > 1e-3
        torch.testing.assert_close(model(**inputs).last_hidden_state, want, atol=0, rtol=0)
        fresh = F.make_plain(spec)
        afkern.patch_model(fresh, NAMES, PLACEMENTS["houlsby"])
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(**inputs).last_hidden_state, want, atol=0, rtol=0)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf, weights_only=False)(**inputs).last_hidden_state, want, atol=0, rtol=0)
        m64 = copy.deepcopy(model).to(torch.float64)
        out64 = m64(**F.cast_inputs(inputs, torch.float64)).last_hidden_state
        assert out64.dtype == torch.float64
        base = afkern.set_backend(copy.deepcopy(model), "reference")(**inputs).last_hidden_state
        judge("float32 against its float64 move", want, base, out64)
        plain_out = F.make_plain(spec)(**inputs).last_hidden_state
        remove_sites(model)
        assert not list(layer_hooks(model))
        torch.testing.assert_close(model(**inputs).last_hidden_state, plain_out, atol=0, rtol=0)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the hooks of an inline-residual family (GPT-2: taps,
    an input replacement and the layer-output replacement) without a graph break: inference and a
    training step by the 2x rule (baseline: afkern's reference backend in float32, which shares no
    code with the compiled fast path). (BART, T5, Llama compile too; one family keeps the suite short.)"""
    torch._dynamo.reset()
    spec, model = _patched("gpt2", "houlsby", dtype=torch.float32)
    inputs = F.make_inputs(spec)
    cm = torch.compile(copy.deepcopy(model), backend="eager", fullgraph=True)
    # the compiled graph rounds at other points than eager (not bit-exact): the 2x rule against a
    # float64 copy, with eager float32 as the baseline
    with torch.no_grad():
        judge("compiled inference", cm(**inputs).last_hidden_state, f64_truth(model, inputs, dtype=torch.float32),
              f64_truth(model, inputs))
    t, truth = f64_step(model, inputs)
    b, base = f64_step(model, inputs, dtype=torch.float32)  # the baseline: afkern's reference in float32
    a = cm(**inputs).last_hidden_state
    judge("compiled training forward", a, b, t)
    a.pow(2).mean().backward()
    got = {k.replace("_orig_mod.", ""): p.grad for k, p in cm.named_parameters()}
    grads = {k: (got[k], base[k], truth[k]) for k in base if ".afkern_" in k and base[k] is not None}
    assert len(grads) >= 16
    assert_2x_all("compiled gradients", grads)


def test_gradient_checkpointing_recomputes_the_sites():
    spec, model = _patched("llama", "houlsby")
    inputs = F.make_inputs(spec)
    model.train()
    a = F.run_with_grads(model, spec, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b = F.run_with_grads(model, spec, inputs)
    assert F.rel_err(b.hidden, a.hidden) < 1e-12
    assert F.rel_err(b.embed_grads[0], a.embed_grads[0]) < 1e-12


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming what was expected, the model untouched
# ---------------------------------------------------------------------------------------------


def _tiny(model_type, **kw):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **kw)).eval()


@pytest.mark.parametrize("model_type,kw,match", [
    ("gptj", dict(n_embd=40, n_layer=1, n_head=4, rotary_dim=8, vocab_size=99, n_positions=64), "parallel attention"),
    ("mpnet", dict(hidden_size=40, num_hidden_layers=1, num_attention_heads=4, intermediate_size=72, vocab_size=99),
     "not an AdapterHub family"),
    ("xlm-roberta-xl", dict(hidden_size=40, num_hidden_layers=1, num_attention_heads=4, intermediate_size=72,
                            vocab_size=99), "no site table entry"),
])
def test_unsupported_family_lists_what_is_supported(model_type, kw, match, tmp_path):
    model = _tiny(model_type, **kw)
    before = _snapshot(model)
    with pytest.raises(TypeError, match=match) as exc:
        afkern.patch_model(model, NAMES)
    assert "GPT-2" in str(exc.value) and "Llama" in str(exc.value) and "T5" in str(exc.value)
    _, src = _patched("bert", "pfeiffer", dtype=torch.float32)
    written = afkern.save_adapterhub(src, str(tmp_path))
    with pytest.raises(TypeError, match=match):
        afkern.load_adapterhub(model, [written[n] for n in NAMES], written["a,b,c"])
    assert _snapshot(model) == before


def test_directory_of_another_family_is_refused(tmp_path):
    _, gpt2 = _patched("gpt2", "houlsby", dtype=torch.float32)
    written = afkern.save_adapterhub(gpt2, str(tmp_path))
    llama = F.make_plain(F.FAMILIES["llama"])
    before = _snapshot(llama)
    with pytest.raises(ValueError, match=r"looks like a directory saved from a gpt2 model.*layers\.<i>\.attention_adapters"):
        afkern.load_adapterhub(llama, [written[n] for n in NAMES], written["a,b,c"])
    assert _snapshot(llama) == before


def test_directory_of_another_width_is_refused(tmp_path):
    import transformers

    spec = F.FAMILIES["llama"]
    cfg = spec.make_config()
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 48, 64, 12
    wide = transformers.LlamaModel(cfg).eval()
    afkern.patch_model(wide, NAMES, PLACEMENTS["pfeiffer"])
    written = afkern.save_adapterhub(wide, str(tmp_path))
    model = F.make_plain(spec)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="hidden size 48, the model has 40"):
        afkern.load_adapterhub(model, [written[n] for n in NAMES], written["a,b,c"])
    assert _snapshot(model) == before


def test_sites_the_model_lacks_are_refused(tmp_path):
    # a cross-attention adapter for a decoder-only model
    gpt2 = F.make_plain(F.FAMILIES["gpt2"])
    before = _snapshot(gpt2)
    with pytest.raises(ValueError, match=r"places \['cross_adapter'\].*gpt2 model.*no such site"):
        afkern.patch_model(gpt2, NAMES, PLACEMENTS["cross"])
    assert _snapshot(gpt2) == before
    # a T5 directory with decoder sites, into an encoder-only T5
    _, t5 = _patched("t5", "cross", dtype=torch.float32)
    written = afkern.save_adapterhub(t5, str(tmp_path))
    import transformers

    torch.manual_seed(0)
    enc = transformers.T5EncoderModel(F.FAMILIES["t5"].make_config()).eval()
    before = _snapshot(enc)
    with pytest.raises(ValueError, match=r"decoder\.block\.0\.layer\.1.*which this T5EncoderModel lacks"):
        afkern.load_adapterhub(enc, [written[n] for n in NAMES], written["a,b,c"])
    assert _snapshot(enc) == before
    # weights for more layers than the model has
    spec = F.FAMILIES["gpt2"]
    cfg = spec.make_config()
    cfg.n_layer = 1
    small = transformers.GPT2Model(cfg).eval()
    _, big = _patched("gpt2", "pfeiffer", dtype=torch.float32)
    written = afkern.save_adapterhub(big, str(tmp_path / "big"))
    with pytest.raises(ValueError, match=r"layer 1 but the model has 1 layers.*h\.1\.output_adapters"):
        afkern.load_adapterhub(small, [written[n] for n in NAMES], written["a,b,c"])


def test_config_assumptions_are_checked():
    import transformers

    cfg = F.FAMILIES["albert"].make_config()
    cfg.chunk_size_feed_forward = 4
    albert = transformers.AlbertModel(cfg, add_pooling_layer=False)
    with pytest.raises(TypeError, match="chunk_size_feed_forward = 0"):
        afkern.patch_model(albert, NAMES)
