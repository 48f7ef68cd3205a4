"""FusedAdapterBlock: API, backends, temperature, dropout, fold cache, bad input."""

import copy
import math

import pytest
import torch

import afkern
from afkern import AdapterConfig, FusedAdapterBlock, FusionConfig

from conftest import perturb_, rel_err
from parity import assert_rounding_bound, assert_same, f64_truth, judge, judge_backends, judge_block

pytestmark = pytest.mark.usefixtures("one_thread")


def _block(d=40, names=("a", "b", "c"), **kw):
    torch.manual_seed(0)
    b = FusedAdapterBlock(d, list(names), in_features=kw.pop("in_features", 72), **kw)
    return perturb_(b)


def test_forward_shapes_3d_and_2d_and_backends_agree():
    b = _block().eval()
    hs, it = torch.randn(2, 7, 72), torch.randn(2, 7, 40)
    outs = {}
    for name in ("reference", "torch"):
        b.set_backend(name)
        outs[name] = b(hs, it)
        assert outs[name].shape == (2, 7, 40)
    judge_backends("torch out", b, (hs, it), "torch", "reference")
    b.set_backend("torch")
    flat = b(hs.reshape(14, 72), it.reshape(14, 40))
    assert_same("[tokens, hidden] input", flat.reshape(2, 7, 40), outs["torch"])  # the block flattens 3-d inputs


def test_block_gradients_match_reference_backend():
    b = _block(fusion_config=FusionConfig.dynamic()).train()
    b.dropout.p = 0.0
    b.score_dropout = 0.0
    hs, it = torch.randn(3, 5, 72), torch.randn(3, 5, 40)
    # output, input and parameter gradients (the key bias cancels in the softmax: the float64
    # truth's gradient is ~0, the fast path has none) and the folded inference output, by the 2x rule
    judge_block("torch", b, hs, it, torch.linspace(-1, 1, 40).expand(3, 5, 40))


def test_fold_cache_is_never_stale():
    b = _block().eval()
    hs, it = torch.randn(9, 72), torch.randn(9, 40)
    with torch.no_grad():
        y0 = b(hs, it)
        f0 = b.cached_folded()
        assert b(hs, it).equal(y0) and b.cached_folded() is f0  # cached
        b.value.weight.mul_(1.1)  # in-place change: version bump
        y1 = b(hs, it)
        assert b.cached_folded() is not f0 and not torch.allclose(y1, y0)
        judge("fold after an in-place write", y1, b.set_backend("reference")(hs, it), f64_truth(b, (hs, it)))
        b.set_backend("torch")
        b.load_state_dict({k: v * 0.9 if "up_" in k else v for k, v in b.state_dict().items()})
        y2 = b(hs, it)
        judge("fold after load_state_dict", y2, b.set_backend("reference")(hs, it), f64_truth(b, (hs, it)))


def test_fold_used_in_eval_only_when_no_grad_needed():
    b = _block().eval()
    hs, it = torch.randn(4, 72), torch.randn(4, 40)
    y = b(hs, it)  # grad enabled, params require grad -> unfolded, differentiable
    assert y.requires_grad and b.cached_folded() is None
    with torch.no_grad():
        b(hs, it)
    assert b.cached_folded() is not None


def test_temperature_anneals_like_adapterhub_and_travels_in_state_dict():
    b = _block(fusion_config=FusionConfig.dynamic(temperature=True)).eval()
    assert b.temperature == 50.0
    hs, it = torch.randn(4, 72), torch.randn(4, 40)
    for _ in range(3):
        b(hs, it)
    assert b.temperature == pytest.approx(50.0 - 3 * 0.05)
    sd = b.state_dict()
    fresh = _block(fusion_config=FusionConfig.dynamic(temperature=True))
    fresh.load_state_dict(sd)
    assert fresh.temperature == pytest.approx(b.temperature)
    b.temperature = 1.02
    b(hs, it)
    b(hs, it)
    assert b.temperature == 1.0


def test_score_dropout_rate_and_only_in_training():
    b = _block(attention_probs_dropout_prob=0.3)
    assert b.score_dropout == 0.3  # dropout_prob None -> model's attention_probs_dropout_prob
    b2 = _block(fusion_config=FusionConfig.dynamic(dropout_prob=0.2))
    assert b2.score_dropout == 0.2
    b.dropout.p = 0.0
    hs, it = torch.randn(64, 72), torch.randn(64, 40)
    b.train()
    torch.manual_seed(1)
    y1 = b(hs, it)
    torch.manual_seed(2)
    y2 = b(hs, it)
    assert rel_err(y1, y2) > 1e-3  # scores dropped differently
    torch.manual_seed(1)
    assert torch.equal(b(hs, it), y1)  # the seed decides the mask
    b.eval()
    y_eval = b(hs, it)
    assert torch.equal(b(hs, it), y_eval) and rel_err(y1, y_eval) > 1e-3
    b.score_dropout = 0.0
    assert torch.equal(b(hs, it), y_eval), "eval must not drop scores (the same function at rate 0)"
    b.train()
    # rate 0: training computes the eval function (baseline: the reference backend in training)
    judge("training at rate 0", b(hs, it), copy.deepcopy(b).set_backend("reference")(hs, it), f64_truth(b, (hs, it)))


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_score_dropout_mask_is_nn_dropouts(rate):
    """AdapterHub drops fusion scores with ``nn.Dropout(p)``: each score kept with probability 1 - p
    and then scaled by exactly 1 / (1 - p). afkern's mask follows that rule, statistically over many
    tokens and exactly: under the same seed it IS nn.Dropout's mask on the [tokens, N] scores."""
    b = _block(names=("a", "b", "c", "d"), attention_probs_dropout_prob=rate)
    T, N = 20000, 4
    torch.manual_seed(7)
    M = b.score_dropout_scale(T, "cpu")
    assert M.shape == (T, N) and M.dtype == torch.float32
    kept_value = torch.nn.Dropout(rate).train()(torch.ones(4096)).max()  # nn.Dropout's own 1 / (1 - p)
    assert_rounding_bound("nn.Dropout's scale", kept_value, 1 / (1 - rate), terms=1)  # 1 / (1 - p) rounded once
    kept = M != 0
    assert torch.equal(M[kept], kept_value.expand(int(kept.sum()))), M.unique()
    sigma = math.sqrt(rate * (1 - rate) / T)  # of one adapter's kept fraction
    frac = kept.double().mean(0)
    assert ((frac - (1 - rate)).abs() <= 5 * sigma).all(), (frac, 1 - rate)
    assert abs(kept.double().mean().item() - (1 - rate)) <= 5 * sigma / math.sqrt(N)
    torch.manual_seed(7)
    assert torch.equal(M, torch.nn.Dropout(rate).train()(torch.ones(T, N)))  # the same draw
    assert not torch.equal(b.score_dropout_scale(T, "cpu"), M)  # a fresh draw each call


def test_score_dropout_mask_of_a_named_fusion_uses_its_rate_and_width():
    b = _block(names=("a", "b", "c"), attention_probs_dropout_prob=0.1)
    sub = b.add_fusion("sub", ["c", "a"], score_dropout=0.4)
    T = 20000
    torch.manual_seed(3)
    M = b.score_dropout_scale(T, "cpu", sub)
    torch.manual_seed(3)
    assert M.shape == (T, 2) and torch.equal(M, torch.nn.Dropout(0.4).train()(torch.ones(T, 2)))
    assert abs((M != 0).double().mean().item() - 0.6) < 0.01
    assert b.score_dropout_scale(T, "cpu").shape == (T, 3)  # the active fusion by default


def test_score_dropout_same_mask_reference_and_torch():
    b = _block(attention_probs_dropout_prob=0.4).train()
    b.dropout.p = 0.0
    hs, it = torch.randn(33, 72), torch.randn(33, 40)
    outs = []
    for name in ("reference", "torch"):
        b.set_backend(name)
        torch.manual_seed(5)
        outs.append(b(hs, it))
    torch.manual_seed(5)  # the float64 copy draws the same mask
    judge("torch under score dropout", outs[1], outs[0], f64_truth(b, (hs, it)))


def test_fusion_weights_recorded_without_sync():
    b = _block().eval()
    b.record_fusion_weights = True
    with torch.no_grad():
        b(torch.randn(2, 3, 72), torch.randn(2, 3, 40))
    w = b.fusion_weights
    assert w.shape == (2, 3, 3) and not w.requires_grad
    # 3 probabilities (each from an exp, a sum and a division) summed: ~8 roundings a row
    assert_rounding_bound("fusion weights' row sums", w.sum(-1), torch.ones(2, 3), terms=8)


def test_single_adapter_mode_equals_adapter_plus_residual():
    b = _block(fusion_config=False).eval()
    assert b.active_adapter == "a"
    b.active_adapter = "b"
    hs, it = torch.randn(5, 72), torch.randn(5, 40)

    def by_hand(b, hs, it):
        h = b.dense(hs)
        x = b.LayerNorm(h + it)
        up = torch.relu(x @ b.down_weight[1].t() + b.down_bias[1]) @ b.up_weight[1] + b.up_bias[1]
        return b.LayerNorm(up + h + it)

    with torch.no_grad():
        expect, truth = by_hand(b, hs, it), by_hand(copy.deepcopy(b).double(), hs.double(), it.double())
        for name in ("reference", "torch"):
            b.set_backend(name)
            judge(f"{name}: single adapter", b(hs, it), expect, truth)


def test_static_fusion_has_no_value_and_regularization_loss():
    torch.manual_seed(0)
    from transformers import BertConfig, BertModel

    m = BertModel(BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=30, vocab_size=50))
    afkern.patch_bert(m, ["x", "y"], fusion_config=FusionConfig.static())
    assert all(b.value is None for _, b in afkern.fused_blocks(m))
    assert afkern.fusion_regularization_loss(m).item() == 0.0
    m2 = BertModel(BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=30, vocab_size=50))
    afkern.patch_bert(m2, ["x", "y"])
    # off-diagonal value weights start at 1e-6: 2 blocks x 24 * 23 squared entries, a float32 sum
    assert_rounding_bound("initial regularisation", afkern.fusion_regularization_loss(m2),
                          2 * 0.01 * (24 * 23) * 1e-12, terms=2 * 24 * 24)
    blocks = [b for _, b in afkern.fused_blocks(m2)]
    with torch.no_grad():
        blocks[0].value.weight.add_(0.1)
    expect = sum(0.01 * (torch.eye(24) - b.value.weight).pow(2).sum() for b in blocks)
    torch.testing.assert_close(afkern.fusion_regularization_loss(m2), expect)


def test_adapterhub_initialisation():
    b = FusedAdapterBlock(64, ["a", "b"])
    assert torch.all(b.down_bias == 0) and torch.all(b.up_bias == 0)
    assert 0.015 < b.down_weight.std().item() < 0.025
    v = b.value.weight
    off = v[~torch.eye(64, dtype=torch.bool)]
    assert torch.all(v.diagonal() == 1.0) and torch.all(off == torch.tensor(1e-6))
    assert torch.all(b.query.bias == 0) and 0.015 < b.query.weight.std().item() < 0.025
    h = FusedAdapterBlock(64, ["a"], adapter_config=AdapterConfig.houlsby(init_weights="houlsby"))
    assert h.down_weight.abs().max() <= 2e-2


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    b = _block()
    with pytest.raises(ValueError, match=r"hidden_states must be \[batch, seq, 72\]"):
        b(torch.randn(2, 3, 40), torch.randn(2, 3, 40))
    with pytest.raises(ValueError, match="input_tensor must be"):
        b(torch.randn(2, 3, 72), torch.randn(2, 4, 40))
    with pytest.raises(ValueError, match="input_tensor must be"):
        b(torch.randn(2, 3, 72), torch.randn(2, 3, 41))
    with pytest.raises(TypeError, match="dtypes differ"):
        b(torch.randn(2, 3, 72), torch.randn(2, 3, 40, dtype=torch.float64))
    with pytest.raises(TypeError, match="block's weights are torch.float32"):
        b(torch.randn(2, 3, 72, dtype=torch.float64), torch.randn(2, 3, 40, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        b(torch.ones(2, 3, 72, dtype=torch.long), torch.ones(2, 3, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="meta but the block's weights are on cpu"):
        b(torch.randn(2, 3, 72, device="meta"), torch.randn(2, 3, 40, device="meta"))


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="at least one adapter"):
        FusedAdapterBlock(40, [])
    with pytest.raises(ValueError, match=r"duplicate adapter names \['a'\]"):
        FusedAdapterBlock(40, ["a", "b", "a"])
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        FusedAdapterBlock(40, ["a"], backend="fast")
    with pytest.raises(ValueError, match="unknown non_linearity 'relux'"):
        AdapterConfig(non_linearity="relux")
    with pytest.raises(ValueError, match="ln_after=True is not supported"):
        AdapterConfig(ln_after=True)
    with pytest.raises(ValueError, match="scaling must be a float"):
        AdapterConfig(scaling="learned")
    with pytest.raises(ValueError, match="post_add' needs original_ln_before"):
        AdapterConfig(residual_before_ln="post_add", original_ln_before=False)
    with pytest.raises(ValueError, match="unknown fusion config fields"):
        FusionConfig.from_dict({"keys": True})
    with pytest.raises(ValueError, match="unknown fusion config name"):
        FusionConfig.load("dynamc")


def test_named_backend_that_cannot_run_raises_with_reason(monkeypatch):
    b = _block()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here: the cuda backend runs on CUDA tensors"):
        b.set_backend("cuda")
    # triton decides interpreter or driver at its first import: import the kernels while the
    # conftest's TRITON_INTERPRET=1 is still set, or later triton tests in this process find no driver
    pytest.importorskip("afkern.kernels.fusion_core")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: .*TRITON_INTERPRET=1"):
        b.set_backend("triton")
    assert b.resolved_backend() == "torch"  # auto on CPU
    assert "auto" in afkern.available_backends("cpu") and "torch" in afkern.available_backends("cpu")
    with pytest.raises(ValueError, match="kernels support"):
        afkern.resolve_backend("triton", "cuda", _block(adapter_config=AdapterConfig(non_linearity="mish")).spec())


def test_scaling_is_folded_and_saved_back():
    b = FusedAdapterBlock(24, ["a"], adapter_config=AdapterConfig(scaling=2.0), fusion_config=False)
    dw, db, uw, ub = torch.randn(1, 24), torch.randn(1), torch.randn(24, 1), torch.randn(24)
    b.set_adapter_weights(0, dw, db, uw, ub)
    assert_same("scaled up weight", b.up_weight[0], 2 * uw.t())
    st = b.adapter_state(0)
    assert_same("adapter_state", {k: st[k] for k in ("adapter_up.weight", "adapter_up.bias")},
                {"adapter_up.weight": uw, "adapter_up.bias": ub})
    with pytest.raises(ValueError, match=r"down_weight must be \(1, 24\) for hidden size 24"):
        b.set_adapter_weights(0, torch.randn(2, 24), db, uw, ub)


def test_deepcopy_and_dtype_move_keep_results():
    b = _block().eval()
    hs, it = torch.randn(6, 72), torch.randn(6, 40)
    with torch.no_grad():
        y = b(hs, it)
        c = copy.deepcopy(b)
        assert_same("deepcopy", c(hs, it), y)
        d = copy.deepcopy(c).double()
        judge("float32 against its .double() move", y, c.set_backend("reference")(hs, it), d(hs.double(), it.double()))


def test_auto_gpu_order_is_torch_until_measured_and_can_be_opted_in(monkeypatch):
    from afkern import backends

    spec = _block().spec()
    assert backends.resolve_backend("auto", "cpu", spec) == "torch"
    monkeypatch.setattr(backends, "backend_status", lambda name, device="cpu": (True, "ok"))
    assert backends.resolve_backend("auto", "cuda", spec) == "torch"  # no GPU benchmark yet
    monkeypatch.setenv("AFKERN_AUTO_GPU", "triton,cuda,torch")
    assert backends.resolve_backend("auto", "cuda", spec) == "triton"
    monkeypatch.setenv("AFKERN_AUTO_GPU", "cuda")
    assert backends.resolve_backend("auto", "cuda", spec) == "cuda"
    mish = _block(adapter_config=AdapterConfig(non_linearity="mish")).spec()
    assert backends.resolve_backend("auto", "cuda", mish) == "torch"  # no kernel for mish
    monkeypatch.setenv("AFKERN_AUTO_GPU", "trition")
    with pytest.raises(ValueError, match="AFKERN_AUTO_GPU lists unknown backends"):
        backends.resolve_backend("auto", "cuda", spec)


def test_fold_cache_after_data_writes_needs_invalidate_or_mode_switch():
    """``param.data`` writes bypass torch's version counter: invalidate_folded() or a train()/eval()
    switch refolds; every write through torch is caught on its own (previous test)."""
    b = _block().eval()
    ref = copy.deepcopy(b).set_backend("reference")
    hs, it = torch.randn(9, 72), torch.randn(9, 40)
    with torch.no_grad():
        b(hs, it)
        for blk in (b, ref):
            blk.query.weight.data.mul_(2.0)
        b.invalidate_folded()
        judge("after invalidate_folded", b(hs, it), ref(hs, it), f64_truth(ref, (hs, it)))
        for blk in (b, ref):
            blk.up_weight.data.mul_(0.5)
        b.eval()  # a mode switch drops the fold too
        judge("after a mode switch", b(hs, it), ref(hs, it), f64_truth(ref, (hs, it)))


def test_adapter_dropout_applies_to_single_adapter_training_only():
    b = _block(fusion_config=False, adapter_config=AdapterConfig(dropout=0.5), hidden_dropout_prob=0.0).train()
    hs, it = torch.randn(5, 72), torch.randn(5, 40)
    outs = {}
    for name in ("reference", "torch"):
        b.set_backend(name)
        torch.manual_seed(3)
        outs[name] = b(hs, it)
    torch.testing.assert_close(outs["torch"], outs["reference"])
    torch.manual_seed(4)
    assert not torch.allclose(b(hs, it), outs["torch"])  # another mask
    b.eval()
    assert torch.equal(b(hs, it), b(hs, it))
    # with fusion, AdapterHub feeds the un-dropped up-projections to the fusion: no adapter dropout
    f = _block(adapter_config=AdapterConfig(dropout=0.5), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    assert f.spec().adapter_dropout == 0.0 and torch.equal(f(hs, it), f(hs, it))


def test_init_weights_seed_gives_every_adapter_the_same_start_and_leaves_global_rng():
    torch.manual_seed(11)
    before = torch.get_rng_state()
    b = FusedAdapterBlock(32, ["a", "b", "c"], adapter_config=AdapterConfig(init_weights_seed=7), fusion_config=False)
    assert torch.equal(b.down_weight[0], b.down_weight[2]) and torch.equal(b.up_weight[1], b.up_weight[2])
    b2 = FusedAdapterBlock(32, ["x"], adapter_config=AdapterConfig(init_weights_seed=7), fusion_config=False)
    assert torch.equal(b2.down_weight[0], b.down_weight[0])
    unseeded = FusedAdapterBlock(32, ["a", "b"], fusion_config=False)
    assert not torch.equal(unseeded.down_weight[0], unseeded.down_weight[1])
    torch.set_rng_state(before)


def test_zero_scaling_and_too_many_adapters_for_kernels_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="scaling must be non-zero"):
        AdapterConfig(scaling=0.0)
    from afkern import backends

    spec = FusedAdapterBlock(24, [f"a{i}" for i in range(65)]).spec()
    monkeypatch.setattr(backends, "backend_status", lambda name, device="cpu": (True, "ok"))
    for name in ("triton", "cuda"):
        with pytest.raises(ValueError, match="at most 64 adapters per block, this block has 65"):
            backends.resolve_backend(name, "cuda", spec)
    monkeypatch.setenv("AFKERN_AUTO_GPU", "triton,cuda,torch")
    assert backends.resolve_backend("auto", "cuda", spec) == "torch"


def test_cuda_backend_error_says_how_to_get_it():
    with pytest.raises(RuntimeError, match="AFKERN_FORCE_CUDA_BUILD=1 pip install --no-build-isolation"):
        _block().set_backend("cuda")


def test_autocast_inference_uses_folded_weights_and_training_works():
    b = _block().eval()
    hs, it = torch.randn(2, 7, 72), torch.randn(2, 7, 40)
    ref16 = copy.deepcopy(b).set_backend("reference")
    truth = f64_truth(b, (hs, it))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, base = b(hs, it), ref16(hs, it)
    # the plain BertOutput's output under autocast is float32 (its LayerNorm runs in float32)
    assert b.cached_folded() is not None and y.dtype == torch.float32
    judge("autocast inference", y, base, truth, dtype=torch.bfloat16)
    assert rel_err(y, truth) > 1000 * torch.finfo(torch.float32).eps  # the GEMMs did run in bfloat16
    b.train()
    b.dropout.p = 0.0
    b.score_dropout = 0.0
    ref16.train()
    ref16.dropout.p = 0.0
    ref16.score_dropout = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = b(hs, it)
        with torch.no_grad():
            base = ref16(hs, it)
    y.float().pow(2).mean().backward()
    judge("autocast training", y.float(), base, truth, dtype=torch.bfloat16)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (b.query.weight, b.key.weight, b.value.weight))
