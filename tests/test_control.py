"""Adapter control (afkern.control): zeroing = dropping, forcing = the single adapter, fixed mixing."""

import copy

import pytest
import torch
import torch.nn.functional as F

import afkern
from afkern.ops.reference import block_prologue, fusion_layer_reference
from conftest import perturb_
from parity import assert_rounding_bound, assert_same

torch.set_grad_enabled(True)


def _tiny_bert(adapter_config="pfeiffer", fusion_config="dynamic", names=("a", "b", "c"), seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                     vocab_size=97, max_position_embeddings=64)
    m = BertModel(cfg).eval().double()
    afkern.patch_bert(m, list(names), adapter_config, fusion_config, backend="torch")
    perturb_(m, 0.3, seed=seed)
    return m


def _block(N=3, d=24, fusion="dynamic", seed=0, in_features=36, residual_before=False):
    torch.manual_seed(seed)
    fc = afkern.FusionConfig.dynamic(residual_before=residual_before) if fusion == "dynamic" else afkern.FusionConfig.static()
    b = afkern.FusedAdapterBlock(d, [f"a{i}" for i in range(N)], afkern.AdapterConfig(reduction_factor=4), fc,
                                 in_features=in_features, hidden_dropout_prob=0.0, dtype=torch.float64).eval()
    perturb_(b, 0.3, seed=seed)
    with torch.no_grad():
        b.LayerNorm.weight.add_(torch.randn(d, dtype=torch.float64) * 0.1)
        b.LayerNorm.bias.add_(torch.randn(d, dtype=torch.float64) * 0.1)
    return b


def _inputs(b, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, b.in_features, generator=g, dtype=torch.float64)
    x = torch.randn(T, b.hidden_size, generator=g, dtype=torch.float64)
    return h, x


def _single_adapter_reference(b, h, x, n):
    """LN(up_n Wv + residual + input) with the reference path's own prologue and adapter."""
    hd = b.dense(h)
    P, spec = b.params(), b.spec()
    xin, _, residual = block_prologue(hd, x, P, spec)
    if b.value is None:  # static fusion: exactly the reference path's single active adapter
        from dataclasses import replace

        return fusion_layer_reference(hd, x, P, replace(spec, fusion=False, active=n))[0]
    up = F.linear(torch.relu(F.linear(xin, P.down_weight[n], P.down_bias[n])), P.up_weight[n].t(), P.up_bias[n])
    hidden = F.linear(up, P.value_weight) + residual
    return F.layer_norm(hidden + x, (b.hidden_size,), P.ln_weight, P.ln_bias, spec.ln_eps)


def _fixed_mix_reference(b, h, x, w):
    hd = b.dense(h)
    P, spec = b.params(), b.spec()
    xin, _, residual = block_prologue(hd, x, P, spec)
    ups = [F.linear(torch.relu(F.linear(xin, P.down_weight[n], P.down_bias[n])), P.up_weight[n].t(), P.up_bias[n])
           for n in range(b.n_adapters)]
    mix = sum(w[n] * ups[n] for n in range(b.n_adapters))
    hidden = (F.linear(mix, P.value_weight) if b.value is not None else mix) + residual
    return F.layer_norm(hidden + x, (b.hidden_size,), P.ln_weight, P.ln_bias, spec.ln_eps)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("fusion", ["dynamic", "static"])
@pytest.mark.parametrize("grad", [False, True], ids=["folded", "autograd"])
@pytest.mark.parametrize("n", [0, 2])
def test_force_adapter_is_single_adapter(backend, fusion, grad, n):
    b = _block(fusion=fusion).set_backend(backend)
    h, x = _inputs(b)
    afkern.record_fusion_weights(b)
    afkern.force_adapter(b, f"a{n}")
    with torch.set_grad_enabled(grad):
        out = b(h, x)
        want = _single_adapter_reference(b, h, x, n)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    onehot = torch.zeros(7, 3)
    onehot[:, n] = 1
    assert_same("forced fusion weights", b.fusion_weights, onehot.to(b.fusion_weights.dtype))
    afkern.clear_fusion_control(b)
    with torch.no_grad():
        assert (b(h, x) - want).abs().max() > 1e-3  # the trained fusion is not the forced one


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("fusion", ["dynamic", "static"])
def test_fixed_mixing_vector(backend, fusion):
    b = _block(N=3, fusion=fusion).set_backend(backend)
    h, x = _inputs(b, T=5)
    w = [0.2, 0.5, 0.3]
    with torch.no_grad():
        afkern.force_fusion_weights(b, w)
        out = b(h, x)
        want = _fixed_mix_reference(b, h, x, w)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
        afkern.force_fusion_weights(b, {"a1": 0.5, "a2": 0.5})
        torch.testing.assert_close(b(h, x), _fixed_mix_reference(b, h, x, [0.0, 0.5, 0.5]), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("residual_before", [False, True])
@pytest.mark.parametrize("grad", [False, True], ids=["folded", "autograd"])
def test_zero_equals_drop_block(residual_before, grad):
    b = _block(N=4, residual_before=residual_before)
    h, x = _inputs(b, T=9)
    kept = afkern.select_adapters(b, ["a3", "a0", "a2"])  # any order: the softmax is permutation-equivariant
    ref = copy.deepcopy(b).set_backend("reference")
    afkern.zero_adapters(b, "a1")
    afkern.zero_adapters(ref, ["a1"])
    afkern.record_fusion_weights(b)
    with torch.set_grad_enabled(grad):
        out = b(h, x)
        torch.testing.assert_close(out, kept(h, x), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(out, ref(h, x), atol=1e-12, rtol=1e-10)
    assert (b.fusion_weights[:, 1] == 0).all()
    w = b.fusion_weights
    # 3 probabilities (each from an exp, a sum and a division) summed: ~8 roundings a row
    assert_rounding_bound("fusion weights' row sums", w.sum(-1), torch.ones(9), terms=8)


def test_zeroed_gradients_match_reference():
    b = _block(N=3)
    ref = copy.deepcopy(b).set_backend("reference")
    h, x = _inputs(b, T=6)
    for m in (b, ref):
        afkern.zero_adapters(m, "a0")
        m(h, x).pow(2).sum().backward()
    for (name, p), (_, q) in zip(b.named_parameters(), ref.named_parameters()):
        # key.bias cancels in the softmax: the fast path leaves its gradient None, the reference ~1e-17
        gp = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(gp, q.grad, atol=1e-10, rtol=1e-8, msg=name)
    assert b.down_weight.grad[0].abs().max() == 0  # a zeroed adapter receives no gradient
    assert b.down_weight.grad[1].abs().max() > 0


@pytest.mark.parametrize("adapter_config", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("fusion_config", ["dynamic", "static"])
def test_zero_equals_drop_model(adapter_config, fusion_config):
    m = _tiny_bert(adapter_config, fusion_config)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        full = m(input_ids=ids, attention_mask=mask).last_hidden_state
        dropped = afkern.drop_adapters(copy.deepcopy(m), "b")
        assert all(blk.adapter_names == ["a", "c"] and blk.down_weight.shape[0] == 2 for _, blk in afkern.fused_blocks(dropped))
        with afkern.fusion_control(m, zero="b"):
            zeroed = m(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(zeroed, dropped(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-12, rtol=1e-10)
        assert (zeroed - full).abs().max() > 1e-4
        # the context manager restored the trained fusion
        assert all(blk.fusion_control is None for _, blk in afkern.fused_blocks(m))
        assert_same("after fusion_control", m(input_ids=ids, attention_mask=mask).last_hidden_state, full)


def test_dropped_model_saves_and_reloads(tmp_path):
    from transformers import BertModel

    m = _tiny_bert()
    afkern.drop_adapters(m, ["a"])
    written = afkern.save_adapterhub(m, str(tmp_path))
    assert set(written) == {"b", "c", "b,c"}
    fresh = BertModel(m.config).eval().double()
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if k in fresh.state_dict()}, strict=False)
    afkern.load_adapterhub(fresh, [written["b"], written["c"]], written["b,c"])
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).last_hidden_state, m(ids).last_hidden_state, atol=1e-12, rtol=1e-10)


def test_control_errors_and_no_partial_change():
    m = _tiny_bert()
    with pytest.raises(ValueError, match="unknown adapters"):
        afkern.zero_adapters(m, "nope")
    with pytest.raises(ValueError, match="leave no adapter"):
        afkern.zero_adapters(m, ["a", "b", "c"])
    with pytest.raises(ValueError, match="leave no adapter"):
        afkern.drop_adapters(m, ["a", "b", "c"])
    with pytest.raises(ValueError, match="sum to 1"):
        afkern.force_fusion_weights(m, [0.5, 0.6, 0.1])
    with pytest.raises(ValueError, match="non-negative"):
        afkern.force_fusion_weights(m, [1.5, -0.5, 0.0])
    with pytest.raises(ValueError, match="one entry per adapter"):
        afkern.force_fusion_weights(m, [0.5, 0.5])
    with pytest.raises(ValueError, match="exactly one"):
        with afkern.fusion_control(m, zero="a", force="b"):
            pass
    assert all(blk.fusion_control is None and blk.n_adapters == 3 for _, blk in afkern.fused_blocks(m))
    single = afkern.FusedAdapterBlock(24, ["x", "y"], fusion_config=False)
    with pytest.raises(ValueError, match="blocks with a fusion"):
        afkern.force_adapter(single, "x")
    from transformers import BertConfig, BertModel

    plain = BertModel(BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="no FusedAdapterBlock"):
        afkern.zero_adapters(plain, "a")
