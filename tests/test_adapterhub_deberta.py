"""AdapterHub's DeBERTa v1, exactly (issue 20, item 4): ``adapters.init`` gives the bias-free
``in_proj`` a random bias; ``from_adapterhub(model, keep_adapterhub_bias=True)`` reproduces that
function (query / value parts folded into ``q_bias`` / ``v_bias``, the key part carried where
``p2c`` attention needs it), tested against AdapterHub in float64; the default still refuses."""

import copy
import os
import sys

import pytest
import torch

pytest.importorskip("adapters")

import afkern  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import families as F  # noqa: E402

NAMES = list(F.ADAPTER_NAMES)

pytestmark = pytest.mark.usefixtures("one_thread")


def _hub(pos_att_type):
    """AdapterHub DeBERTa with its random in_proj bias kept (not zeroed as the harness does)."""
    spec = F.FAMILIES["deberta"]
    config = spec.make_config()
    config.pos_att_type = list(pos_att_type)
    torch.manual_seed(0)
    plain = getattr(__import__("transformers"), spec.model_class)(config).eval()
    return spec, plain, F.make_adapterhub(spec, "double_seq_bn", plain=plain, calibrate=False, zero_added=False)


@pytest.mark.parametrize("pos_att_type", [("c2p", "p2c"), ("c2p",), ("p2c",)])
def test_keep_adapterhub_bias_matches_adapterhub(pos_att_type):
    spec, plain, hub = _hub(pos_att_type)
    biases = [p for n, p in hub.named_parameters() if n.endswith("in_proj.bias")]
    assert len(biases) == 2 and all(b.abs().max() > 1e-3 for b in biases)  # the random bias is there
    with pytest.raises(ValueError, match="keep_adapterhub_bias=True"):
        afkern.from_adapterhub(hub)
    conv = afkern.from_adapterhub(hub, backend="torch", keep_adapterhub_bias=True)
    layers = [m.attention.self for m in conv.encoder.layer]
    if "p2c" in pos_att_type:  # the key part is carried: zero in the query and value rows
        for attn in layers:
            b = attn.in_proj.bias.view(attn.num_attention_heads, 3, -1)
            assert b[:, 1].abs().max() > 1e-3 and b[:, 0].abs().max() == 0 and b[:, 2].abs().max() == 0
    else:  # softmax-invariant: the plain transformers structure
        assert all(attn.in_proj.bias is None for attn in layers)
    inputs = F.make_inputs(spec)
    o64 = F.run_with_grads(copy.deepcopy(hub).double(), spec, inputs)
    a64 = F.run_with_grads(copy.deepcopy(conv).double(), spec, inputs)
    assert F.rel_err(a64.hidden, o64.hidden) < 1e-9
    for g, w in zip(a64.embed_grads, o64.embed_grads):
        assert F.rel_err(g, w) < 1e-9
    # the bias matters: the zeroed model (what afkern computed before) is another function
    zeroed = copy.deepcopy(hub).double()
    F.zero_added_base_params_(zeroed, plain)
    with torch.no_grad():
        assert F.rel_err(zeroed(**inputs).last_hidden_state, o64.hidden) > 1e-3


def test_accelerate_runs_adapterhub_deberta_with_its_bias():
    """accelerate leaves AdapterHub's attention (and its bias) alone: AdapterHub's function."""
    spec, _, hub = _hub(("c2p", "p2c"))
    inputs = F.make_inputs(spec)
    hub64 = copy.deepcopy(hub).double()
    want = F.run_with_grads(hub64, spec, inputs)
    got = F.run_with_grads(afkern.accelerate(copy.deepcopy(hub64), backend="torch"), spec, inputs)
    assert F.rel_err(got.hidden, want.hidden) < 1e-9
    for g, w in zip(got.embed_grads, want.embed_grads):
        assert F.rel_err(g, w) < 1e-9
