"""Round trips with head models, both ways, as a new user tries them (issue 20, item 5).

For every family's usual head class: an AdapterHub model with that head (``adapters.init``, three
adapters, a Fuse) -> ``from_adapterhub`` keeps the head class and its weights (same logits,
float64 1e-9) -> ``save_adapterhub`` -> AdapterHub's ``load_adapter`` / ``load_adapter_fusion``
into the base class, the head class and the ``*AdapterModel`` class: every adapter and fusion
weight arrives (none silently skipped) and the outputs equal AdapterHub's.
"""

import copy
import os
import sys

import pytest
import torch

adapters = pytest.importorskip("adapters")
import transformers  # noqa: E402
from adapters import Fuse  # noqa: E402

import afkern  # noqa: E402
from afkern.model import structure_kwargs  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import families as F  # noqa: E402

NAMES = list(F.ADAPTER_NAMES)
FUSION = ",".join(NAMES)
HEADS = {
    "bert": "BertForSequenceClassification", "deberta": "DebertaForSequenceClassification",
    "distilbert": "DistilBertForSequenceClassification", "albert": "AlbertForSequenceClassification",
    "bart": "BartForConditionalGeneration", "t5": "T5ForConditionalGeneration", "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "vit": "ViTForImageClassification",
}
NO_ADAPTER_MODEL = {"qwen2"}  # a plugin family of adapters 1.3.0: no Qwen2AdapterModel class

pytestmark = pytest.mark.usefixtures("one_thread")


def _hub(name):
    spec = F.FAMILIES[name]
    torch.manual_seed(0)
    plain = getattr(transformers, HEADS[name])(spec.make_config()).eval()
    hub = copy.deepcopy(plain)
    adapters.init(hub)
    F.zero_added_base_params_(hub, plain)  # DeBERTa v1: the random in_proj bias adapters.init adds
    for n in NAMES:
        hub.add_adapter(n, config=F.adapter_config("double_seq_bn" if spec.supports_double else "seq_bn"))
    hub.add_adapter_fusion(Fuse(*NAMES))
    hub.set_active_adapters(Fuse(*NAMES))
    F.perturb_adapterhub_(hub)
    return spec, plain, hub.eval()


def _inputs(spec):
    inputs = F.make_inputs(spec)
    if spec.kind == "encoder-decoder":
        inputs.pop("use_cache")
    return inputs


def _forward(model, inputs):
    """(head output, base model's last hidden state) of one no-grad forward in float64."""
    model = model.double().eval()
    base = model.base_model if model.base_model is not model else model.get_decoder()
    seen = []
    h = base.register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
    try:
        with torch.no_grad():
            out = model(**F.cast_inputs(inputs, torch.float64))
    finally:
        h.remove()
    return out[0], seen[-1]


def _adapter_weights(model):
    """{key relative to the base model: tensor} of every adapter and fusion parameter."""
    prefix = model.base_model_prefix + "."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in model.state_dict().items()
            if F._is_adapter_param(k)}


def _load(model, dirs):
    for n in NAMES:
        model.load_adapter(dirs[n])
    model.load_adapter_fusion(dirs[FUSION], set_active=True)
    return model.eval()


@pytest.mark.parametrize("name", list(HEADS))
def test_head_model_round_trip(name, tmp_path):
    spec, plain, hub = _hub(name)
    inputs = _inputs(spec)
    want_head, want_base = _forward(copy.deepcopy(hub), inputs)
    # AdapterHub head model -> afkern: the head is kept
    conv = afkern.from_adapterhub(hub, backend="torch")
    assert type(conv) is type(plain)
    got_head, got_base = _forward(copy.deepcopy(conv), inputs)
    assert F.rel_err(got_head, want_head) < 1e-9 and F.rel_err(got_base, want_base) < 1e-9
    # afkern -> AdapterHub: base, head and *AdapterModel classes all load every weight
    dirs = afkern.save_adapterhub(conv, str(tmp_path))
    want_w = _adapter_weights(hub)
    fresh_head = copy.deepcopy(plain)
    adapters.init(fresh_head)
    F.zero_added_base_params_(fresh_head, plain)
    targets = {"head": _load(fresh_head, dirs)}
    base_cls = type(plain.base_model) if plain.base_model is not plain else getattr(transformers, spec.model_class)
    fresh_base = base_cls(plain.config, **structure_kwargs(base_cls, plain.base_model))
    missing, unexpected = fresh_base.load_state_dict(_base_state(plain), strict=True)
    bare = copy.deepcopy(fresh_base)  # before adapters.init: which parameters it adds
    adapters.init(fresh_base)
    F.zero_added_base_params_(fresh_base, bare)
    targets["base"] = _load(fresh_base, dirs)
    if name in NO_ADAPTER_MODEL:
        with pytest.raises(ValueError, match="Unrecognized configuration"):
            adapters.AutoAdapterModel.from_config(plain.config)
    else:
        am = adapters.AutoAdapterModel.from_config(plain.config)
        missing, unexpected = am.base_model.load_state_dict(_base_state(plain), strict=False)
        assert not unexpected and set(missing) <= set(am.base_model.state_dict()) - set(bare.state_dict())
        F.zero_added_base_params_(am.base_model, bare)
        targets["adapter_model"] = _load(am, dirs)
    for what, m in targets.items():
        got_w = _adapter_weights(m)
        assert got_w.keys() == want_w.keys(), what
        for k, v in want_w.items():
            assert torch.equal(got_w[k], v), (what, k)
    head, base = _forward(targets["head"], inputs)
    assert F.rel_err(head, want_head) < 1e-12 and F.rel_err(base, want_base) < 1e-12
    _, base = _forward(targets["base"], inputs)
    assert F.rel_err(base, want_base) < 1e-12
    if "adapter_model" in targets:
        with torch.no_grad():
            out = targets["adapter_model"].double()(**F.cast_inputs(inputs, torch.float64))
        got = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if name == "t5":  # T5AdapterModel returns the decoder output rescaled for its tied LM head
            got = got / plain.config.d_model ** -0.5
        assert F.rel_err(got, want_base) < 1e-12


def _base_state(plain):
    """The base model's weights of a head model, as a base-class model names them."""
    base = plain.base_model
    if base is not plain:
        return base.state_dict()
    return {k: v for k, v in plain.state_dict().items() if not k.startswith("lm_head.")}  # T5


def test_adapter_model_heads_are_named_in_a_warning():
    spec = F.FAMILIES["bert"]
    torch.manual_seed(0)
    am = adapters.AutoAdapterModel.from_config(spec.make_config())
    for n in NAMES:
        am.add_adapter(n, config=F.adapter_config("seq_bn"))
    am.add_adapter_fusion(Fuse(*NAMES))
    am.add_classification_head("sst", num_labels=2)
    am.set_active_adapters(Fuse(*NAMES))
    F.perturb_adapterhub_(am.eval())
    with pytest.warns(UserWarning, match=r"flexible heads \['sst'\]"):
        conv = afkern.from_adapterhub(am, backend="torch")
    assert type(conv) is transformers.BertModel
    inputs = _inputs(spec)
    with torch.no_grad():
        want = copy.deepcopy(am).double()(**inputs, output_hidden_states=True).hidden_states[-1]
        got = copy.deepcopy(conv).double()(**inputs).last_hidden_state
    assert F.rel_err(got, want) < 1e-9


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5"])
def test_base_model_directories_load_into_head_classes(name, tmp_path):
    """A bare base model's directories (keys under the base_model_prefix) load, fusion included,
    into AdapterHub's head class: the fusion loader skips keys without the prefix silently."""
    spec, plain, hub = F.build(name, "seq_bn")
    dirs = afkern.save_adapterhub(afkern.from_adapterhub(hub, backend="torch"), str(tmp_path))
    head = getattr(transformers, HEADS[name])(plain.config)
    adapters.init(head)
    _load(head, dirs)
    want = _adapter_weights(hub)
    got = _adapter_weights(head)
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
