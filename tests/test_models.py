"""Model families: patching, fused vs reference outputs and gradients, AdapterHub-directory round
trips, and parity with `adapters` (where installed) on tiny random configs.

Runs on transformers 4.57 (make test) and 5.x (scripts/test_tf5.sh); the `adapters` parity tests
skip on 5.x, where `adapters` does not install (AdapterHub issue #834).
"""

import copy

import pytest
import torch

import afkern
from conftest import perturb_, token_batch

COMMON = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72, vocab_size=97,
              max_position_embeddings=64)
# model_type -> base-model prefix in the *ForSequenceClassification checkpoint
FAMILIES = {
    "bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "electra": "electra",
    "deberta-v2": "deberta", "camembert": "roberta", "data2vec-text": "data2vec_text", "ernie": "ernie",
    "layoutlm": "layoutlm",
}
# families the `adapters` package supports with the same BertOutput placement
ADAPTERHUB_FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "deberta-v2"]
NAMES = ["a", "b", "c"]


def _config(model_type):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, num_labels=3, **COMMON)


def _model(model_type, head=False, seed=0):
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if head else AutoModel
    return cls.from_config(_config(model_type)).eval().double()


def _inputs(seed=0):
    return token_batch(2, 11, 7, seed, low=5, high=90)


def _hidden(model, inputs):
    out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1]


def _fresh_like(model, model_type, head):
    fresh = _model(model_type, head=head, seed=1)
    keys = set(fresh.state_dict())
    missing, _ = fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k in keys}, strict=False)
    assert all(k.startswith("pooler.") for k in missing), missing  # RoBERTa heads build the base without pooler
    return fresh


@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("adapter_config", ["pfeiffer", "houlsby"])
def test_family_fused_matches_reference(model_type, adapter_config):
    """Whole model, fusion training mode (dropout off): torch fast path vs the naive reference,
    last hidden state and the gradient of every trainable tensor; then the folded inference path."""
    model = _model(model_type)
    plain_out = _hidden(model, _inputs()).detach()
    afkern.patch_bert(model, NAMES, adapter_config, "dynamic", backend="torch")
    perturb_(model, 0.3)
    blocks = list(afkern.fused_blocks(model))
    assert len(blocks) == (4 if adapter_config == "houlsby" else 2)
    ref = copy.deepcopy(model)
    afkern.set_backend(ref, "reference")
    inputs = _inputs()
    outs = []
    for m in (model, ref):
        m.zero_grad()
        out = _hidden(m, inputs)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).pow(2).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-9)
    assert (outs[0] - plain_out).abs().max() > 1e-3  # the adapters change the output
    n_checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        gp = torch.zeros_like(p) if p.grad is None else p.grad  # key.bias cancels in the softmax
        torch.testing.assert_close(gp, q.grad, atol=1e-9, rtol=1e-7, msg=name)
        n_checked += 1
    assert n_checked > 20
    with torch.no_grad():  # folded inference weights
        torch.testing.assert_close(_hidden(model, inputs), outs[1], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_family_save_load_round_trip(tmp_path, model_type, safetensors):
    model = _model(model_type, head=True)
    afkern.patch_bert(model, NAMES, "houlsby", "static" if safetensors else "dynamic")
    perturb_(model, 0.3)
    written = afkern.save_adapterhub(model, str(tmp_path), safe_serialization=safetensors)
    if safetensors:
        from safetensors.torch import load_file

        keys = list(load_file(f"{written['a']}/adapter.safetensors"))
        assert all(k.startswith(FAMILIES[model_type] + ".encoder.layer.") for k in keys), keys[:2]
    fresh = _fresh_like(model, model_type, head=True)
    afkern.load_adapterhub(fresh, [written[n] for n in NAMES], written["a,b,c"])
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, atol=1e-10, rtol=1e-9)
        # into the bare base model too: the base prefix is stripped
        base = _fresh_like(model.base_model, model_type, head=False)
        afkern.load_adapterhub(base, [written[n] for n in NAMES], written["a,b,c"])
        torch.testing.assert_close(base(**inputs).last_hidden_state, model.base_model(**inputs).last_hidden_state,
                                   atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("model_type", ADAPTERHUB_FAMILIES)
def test_family_matches_adapters(tmp_path, model_type):
    """The `adapters` model, its saved directories loaded by afkern, and from_adapterhub agree."""
    adapters = pytest.importorskip("adapters")
    from adapters.composition import Fuse

    ah = _model(model_type, head=True).float()
    adapters.init(ah)
    for n in NAMES:
        ah.add_adapter(n, config="double_seq_bn")
    ah.add_adapter_fusion(Fuse(*NAMES), "dynamic")
    ah.set_active_adapters(Fuse(*NAMES))
    perturb_(ah, 0.3)
    ah.double().eval()
    for n in NAMES:
        ah.save_adapter(str(tmp_path / n), n, use_safetensors=True)
    ah.save_adapter_fusion(str(tmp_path / "f"), ",".join(NAMES), use_safetensors=True)
    inputs = _inputs()
    with torch.no_grad():
        want = ah(**inputs, output_hidden_states=True)
        plain = _fresh_like(ah, model_type, head=True)
        afkern.load_adapterhub(plain, [str(tmp_path / n) for n in NAMES], str(tmp_path / "f"))
        got = plain(**inputs, output_hidden_states=True)
        torch.testing.assert_close(got.hidden_states[-1], want.hidden_states[-1], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-10, rtol=1e-9)
        conv = afkern.from_adapterhub(ah)  # keeps the head (issue 20)
        got = conv(**inputs, output_hidden_states=True)
        torch.testing.assert_close(got.hidden_states[-1], want.hidden_states[-1], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("model_type,match", [
    ("mpnet", "not an AdapterHub family"),
    ("megatron-bert", "pre-LN BERT"),  # no LayerNorm in the output modules
    ("xlm-roberta-xl", "not BERT-style"),  # pre-LN too, and no site table entry
])
def test_unsupported_families_clear_error(model_type, match):
    """(DeBERTa v1, DistilBERT and the other families of the site table: tests/test_families.py.)"""
    from transformers import AutoConfig, AutoModel

    kw = dict(COMMON)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **kw))
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(TypeError, match=match):
        afkern.patch_bert(model, NAMES, "houlsby")
    assert [(n, type(m)) for n, m in model.named_modules()] == before
