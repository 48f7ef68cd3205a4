"""Several fusions over one adapter set, routed per sequence in one batch (afkern.routing,
the one layer ``afkern.ops.layer.fusion_layer`` over a segment plan, docs/DESIGN.md section 7).

The judge: a routed output equals each sequence run alone with its fusion active (float64, 1e-9
relative), forward and every gradient, on every backend; the triton backend (interpreter) and the
cuda backend's primitives (CPU kernels of its custom ops) at float32 tolerance against the same.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import afkern
from afkern.compiler import adapter_segments, block_params, routed_folds, routed_spec, segments, single_spec
from afkern.ops.layer import fusion_layer
from afkern.ops.segments import SegmentPlan, route_plan, seg_mm_torch
from conftest import perturb_, rel_err
from parity import assert_f64, assert_same, judge

torch.set_grad_enabled(True)

ADAPTERS = ["a", "b", "c", "d"]
# where the kernel cases run: CUDA on a GPU machine (AFKERN_TEST_GPU=1: Triton compiled, the cuda
# backend's extension), else CPU tensors (Triton interpreter, the custom ops' CPU kernels)
KDEV = "cuda" if os.environ.get("AFKERN_TEST_GPU") == "1" and torch.cuda.is_available() else "cpu"
# name -> (adapters, config): subsets, another order, static, no query, temperature, and the two
# structural flags (query_before_ln, residual_before) mixed with the plain ones in one batch
FUSIONS = {
    "sub": (["c", "a"], afkern.FusionConfig.static()),
    "tri": (["b", "c", "d"], afkern.FusionConfig.dynamic()),
    "rev": (["d", "c", "b", "a"], afkern.FusionConfig.dynamic(query=False)),
    "hot": (["a", "b", "d"], afkern.FusionConfig.dynamic(temperature=True)),
    "qbl": (["a", "d"], afkern.FusionConfig.dynamic(query_before_ln=True)),
    "rb": (["b", "d", "a"], afkern.FusionConfig.dynamic(residual_before=True)),
}
PLAIN = {k: v for k, v in FUSIONS.items() if k in ("sub", "tri", "rev")}


def _tiny_bert(fusions=FUSIONS, seed=0, dtype=torch.float64, hidden_dropout=0.0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                     vocab_size=97, max_position_embeddings=64, hidden_dropout_prob=hidden_dropout,
                     attention_probs_dropout_prob=0.0)
    m = BertModel(cfg).eval().to(dtype)
    afkern.patch_bert(m, ADAPTERS, backend="torch")
    for name, (names, fc) in fusions.items():
        afkern.add_fusion(m, name, names, fc)
    perturb_(m, 0.3, seed=seed)
    return m


def _block(fusions=FUSIONS, seed=0, dtype=torch.float64, d=24, backend="torch"):
    torch.manual_seed(seed)
    b = afkern.FusedAdapterBlock(d, ADAPTERS, afkern.AdapterConfig(reduction_factor=4), in_features=36,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dtype=dtype,
                                 backend=backend).eval()
    for name, (names, fc) in fusions.items():
        b.add_fusion(name, names, fc)
    perturb_(b, 0.3, seed=seed)
    with torch.no_grad():
        b.LayerNorm.weight.add_(torch.randn(d, dtype=dtype) * 0.1)
        b.LayerNorm.bias.add_(torch.randn(d, dtype=dtype) * 0.1)
    return b


def _batch(B=5, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 5:] = 0
    mask[min(3, B - 1), 2:] = 0
    return ids, mask


def _temperatures(m):
    return [f.temperature for _, b in afkern.fused_blocks(m) for f in b.fusions.values()]


def _alone(m, ids, mask, route, temps=None):
    """Each sequence alone, with its fusion active (temperatures reset to ``temps`` first)."""
    outs = []
    for i, f in enumerate(route):
        if temps is not None:
            _set_temperatures(m, temps)
        afkern.set_active_fusion(m, f)
        outs.append(m(ids[i:i + 1], attention_mask=mask[i:i + 1]).last_hidden_state)
    return torch.cat(outs)


def _set_temperatures(m, temps):
    it = iter(temps)
    for _, b in afkern.fused_blocks(m):
        for f in b.fusions.values():
            f.temperature = next(it)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("grad", [False, True])
def test_routed_model_equals_each_sequence_alone(backend, grad):
    m = _tiny_bert()
    afkern.set_backend(m, backend)
    ids, mask = _batch(B=8)
    route = ["tri", "a,b,c,d", "sub", "qbl", "rev", "hot", "rb", 3]  # 3: the 4th fusion, "tri"
    temps = _temperatures(m)
    with torch.set_grad_enabled(grad):
        with afkern.route(m, fusion=route):
            out = m(ids, attention_mask=mask).last_hidden_state
        after = _temperatures(m)
        ref = _alone(m, ids, mask, [afkern.fusion_names(m)[r] if isinstance(r, int) else r for r in route], temps)
    assert rel_err(out, ref) < 1e-9
    # each fusion present annealed once per block and forward, as alone; the others did not move
    hot = afkern.fused_blocks(m).__next__()[1].fusions["hot"]
    assert hot.config.temperature
    assert after != temps and [a == t for a, t in zip(after, temps)].count(False) == 2  # "hot" in 2 blocks


def test_route_is_a_permutation_free_noop_when_grouped_and_one_fusion_equals_active():
    m = _tiny_bert(PLAIN)
    ids, mask = _batch(B=4)
    with torch.no_grad():
        afkern.set_active_fusion(m, "tri")
        whole = m(ids, attention_mask=mask).last_hidden_state
        with afkern.route(m, fusion=["tri"] * 4):
            routed = m(ids, attention_mask=mask).last_hidden_state
        assert rel_err(routed, whole) < 1e-12
        plan = route_plan([0, 0, 1, 1], ["x", "y"], 3, "cpu")
        assert plan.perm is None and plan.bounds == [(0, 6), (6, 12)]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradients_reach_each_fusion_from_its_own_sequences_only(backend):
    m = _tiny_bert(PLAIN).train()  # hidden and score dropout are 0: training mode, deterministic
    afkern.set_backend(m, backend)
    ids, mask = _batch(B=5)
    route = ["tri", "sub", "tri", "sub", "tri"]  # "rev" and "a,b,c,d" absent
    w = torch.randn(5, 9, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = dict(m.named_parameters())
    with afkern.route(m, fusion=route):
        (m(ids, attention_mask=mask).last_hidden_state * w).sum().backward()
    routed = {k: (None if p.grad is None else p.grad.clone()) for k, p in params.items()}
    m.zero_grad(set_to_none=True)
    for i, f in enumerate(route):
        afkern.set_active_fusion(m, f)
        (m(ids[i:i + 1], attention_mask=mask[i:i + 1]).last_hidden_state * w[i:i + 1]).sum().backward()
    for k, p in params.items():
        a, b = routed[k], p.grad
        if ".fusions.rev." in k or ".fusions.a,b,c,d." in k:
            assert a is None or a.abs().max() == 0, f"{k}: an absent fusion got gradient"
            continue
        if b is None:
            assert a is None or a.abs().max() < 1e-12, k
            continue
        assert a is not None, k
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13, msg=lambda msg: f"{k}: {msg}")


def test_score_dropout_draws_per_fusion_same_on_reference_and_torch():
    m = _tiny_bert(PLAIN).train()
    for _, b in afkern.fused_blocks(m):
        b.fusions["tri"].score_dropout = 0.5
        b.fusions["sub"].score_dropout = 0.2
    ids, mask = _batch(B=5)
    route = ["tri", "sub", "tri", "a,b,c,d", "sub"]
    outs = {}
    for backend in ("reference", "torch"):
        afkern.set_backend(m, backend)
        torch.manual_seed(7)
        with afkern.route(m, fusion=route):
            outs[backend] = m(ids, attention_mask=mask).last_hidden_state
    assert rel_err(outs["torch"], outs["reference"]) < 1e-9
    with torch.no_grad():
        m.eval()
        with afkern.route(m, fusion=route):
            plain = m(ids, attention_mask=mask).last_hidden_state
    assert rel_err(plain, outs["torch"]) > 1e-3  # dropout did act


def test_score_dropout_with_an_annealed_temperature_routed():
    """Score dropout and the temperature together: the per-token scale M carries both (the row-op
    contract multiplies s by M * inv_temperature); routed torch equals the routed reference."""
    m = _tiny_bert({k: FUSIONS[k] for k in ("hot", "tri")}).train()
    for _, b in afkern.fused_blocks(m):
        b.fusions["hot"].score_dropout = 0.3
        b.fusions["hot"].temperature = 7.0  # far from 1: a forgotten 1/T changes the softmax
        b.fusions["tri"].score_dropout = 0.3
    ids, mask = _batch(B=4)
    route = ["hot", "tri", "hot", "tri"]
    outs = {}
    for backend in ("reference", "torch"):
        afkern.set_backend(m, backend)
        for _, b in afkern.fused_blocks(m):
            b.fusions["hot"].temperature = 7.0
        torch.manual_seed(11)
        with afkern.route(m, fusion=route):
            outs[backend] = m(ids, attention_mask=mask).last_hidden_state
    assert rel_err(outs["torch"], outs["reference"]) < 1e-9


def test_no_grad_uses_folded_maps_and_refolds_after_a_step():
    m = _tiny_bert(PLAIN)
    ids, mask = _batch(B=4)
    route = ["sub", "tri", "rev", "tri"]
    with torch.no_grad(), afkern.route(m, fusion=route):
        m(ids, attention_mask=mask)
    blk = next(afkern.fused_blocks(m))[1]
    folds = dict(zip(blk.fusions, routed_folds(blk, list(blk.fusions))))
    assert routed_folds(blk, ["tri"])[0] is folds["tri"]  # cached, one stack per map
    assert folds["tri"].w_q.data_ptr() - folds["sub"].w_q.data_ptr() == folds["sub"].w_q.numel() * 8
    with torch.no_grad():
        blk.fusions["tri"].query.weight.mul_(1.5)  # a version bump: the cached fold must not be used
        with afkern.route(m, fusion=route):
            out = m(ids, attention_mask=mask).last_hidden_state
        ref = _alone(m, ids, mask, route)
    assert rel_err(out, ref) < 1e-9
    again = routed_folds(blk, ["sub"])[0]
    blk.invalidate_folded()
    assert routed_folds(blk, ["sub"])[0] is not again  # dropped: folded afresh


def test_autocast_routed_equals_alone_in_bf16():
    m = _tiny_bert(PLAIN, dtype=torch.float32)
    ids, mask = _batch(B=4)
    route = ["sub", "tri", "rev", "tri"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with afkern.route(m, fusion=route):
            out = m(ids, attention_mask=mask).last_hidden_state
        ref = _alone(m, ids, mask, route)
    with torch.no_grad():
        truth = _alone(copy.deepcopy(m).double(), ids, mask, route)
    judge("routed under bfloat16 autocast", out.float(), ref.float(), truth, dtype=torch.bfloat16)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16), afkern.route(m, fusion=route):
        m(ids, attention_mask=mask).last_hidden_state.float().pow(2).mean().backward()
    blk = next(afkern.fused_blocks(m))[1]
    assert blk.fusions["tri"].query.weight.grad is not None and blk.fusions["a,b,c,d"].query.weight.grad is None


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_adapter_routing_equals_each_sequence_with_its_adapter(backend):
    m = _tiny_bert(PLAIN).train()
    afkern.set_backend(m, backend)
    ids, mask = _batch(B=5)
    route = ["d", "a", 2, "a", "d"]  # 2: adapter "c"
    w = torch.randn(5, 9, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with afkern.route(m, adapter=route):
        out = m(ids, attention_mask=mask).last_hidden_state
    (out * w).sum().backward()
    g_routed = next(afkern.fused_blocks(m))[1].down_weight.grad.clone()
    m.zero_grad(set_to_none=True)
    active = next(afkern.fused_blocks(m))[1].active_fusion
    outs = []
    for i, a in enumerate(["d", "a", "c", "a", "d"]):
        afkern.set_active_adapter(m, a)
        o = m(ids[i:i + 1], attention_mask=mask[i:i + 1]).last_hidden_state
        (o * w[i:i + 1]).sum().backward()
        outs.append(o.detach())
    assert rel_err(out, torch.cat(outs)) < 1e-9
    g = next(afkern.fused_blocks(m))[1].down_weight.grad
    assert rel_err(g_routed, g) < 1e-9 and g_routed[1].abs().max() == 0  # "b" has no sequence
    afkern.set_active_fusion(m, active)


def test_per_token_route_on_2d_block_inputs_and_houlsby_sites():
    b = _block()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(11, 36, generator=g, dtype=torch.float64)
    x = torch.randn(11, 24, generator=g, dtype=torch.float64)
    names = list(b.fusions)
    route = [names[i % len(names)] for i in (0, 3, 5, 1, 1, 6, 2, 4, 0, 3, 6)]
    temps = [f.temperature for f in b.fusions.values()]
    with torch.no_grad():
        with afkern.route(b, fusion=route):
            out = b(h, x)
        ref = []
        for t, f in enumerate(route):
            for fu, tt in zip(b.fusions.values(), temps):
                fu.temperature = tt
            b.set_active_fusion(f)
            ref.append(b(h[t:t + 1], x[t:t + 1]))
    assert rel_err(out, torch.cat(ref)) < 1e-9


def test_houlsby_model_routes_both_sites():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                     vocab_size=97, max_position_embeddings=64, hidden_dropout_prob=0.0)
    m = BertModel(cfg).eval().double()
    afkern.patch_bert(m, ["a", "b", "c"], afkern.AdapterConfig.houlsby())
    afkern.add_fusion(m, "ab", ["a", "b"])
    perturb_(m, 0.3)
    assert len(list(afkern.fused_blocks(m))) == 4
    ids, mask = _batch(B=3)
    with torch.no_grad():
        with afkern.route(m, fusion=["ab", "a,b,c", "ab"]):
            out = m(ids, attention_mask=mask).last_hidden_state
        ref = _alone(m, ids, mask, ["ab", "a,b,c", "ab"])
    assert rel_err(out, ref) < 1e-9


def test_controls_work_per_fusion_under_routing():
    m = _tiny_bert(PLAIN)
    ids, mask = _batch(B=4)
    route = ["tri", "rev", "tri", "sub"]
    afkern.zero_adapters(m, "c", fusion="tri")
    afkern.force_adapter(m, "d", fusion="rev")
    with torch.no_grad():
        with afkern.route(m, fusion=route):
            out = m(ids, attention_mask=mask).last_hidden_state
        ref = _alone(m, ids, mask, route)  # set_active_fusion keeps each fusion's own control
        afkern.clear_fusion_control(m, fusion="tri")
        afkern.clear_fusion_control(m, fusion="rev")
        with afkern.route(m, fusion=route):
            plain = m(ids, attention_mask=mask).last_hidden_state
    assert rel_err(out, ref) < 1e-9 and rel_err(out, plain) > 1e-3
    afkern.set_active_fusion(m, "tri")
    with pytest.raises(ValueError, match="unknown fusion"):
        afkern.zero_adapters(m, "c", fusion="nope")
    with pytest.raises(ValueError, match="unknown adapters"):
        afkern.zero_adapters(m, "a", fusion="tri")  # "tri" has b, c, d


def test_recorded_fusion_weights_per_fusion():
    m = _tiny_bert(PLAIN)
    ids, mask = _batch(B=4)
    route = ["tri", "sub", "tri", "sub"]
    afkern.record_fusion_weights(m)
    with torch.no_grad(), afkern.route(m, fusion=route):
        m(ids, attention_mask=mask)
    assert next(afkern.fused_blocks(m))[1].fusion_weights.shape == (4, 9, 4)  # all of the block's adapters
    w = afkern.fusion_weights(m, mask, fusion="sub")
    first = next(iter(w.values()))
    assert first.shape == (2,) and abs(float(first.sum()) - 1) < 1e-9  # over "sub"'s adapters c, a
    with torch.no_grad():
        afkern.set_active_fusion(m, "sub")
        m(ids[1::2], attention_mask=mask[1::2])
    alone = afkern.fusion_weights(m, mask[1::2], fusion="sub")
    for k in w:
        assert rel_err(w[k], alone[k]) < 1e-9
    with pytest.raises(ValueError, match="ran fusion 'sub', not 'tri'"):
        afkern.fusion_weights(m, fusion="tri")


def test_prune_fusion_restricts_one_fusion_and_equals_zeroing():
    m = _tiny_bert(PLAIN)
    ids, mask = _batch(B=4)
    route = ["tri", "rev", "tri", "sub"]
    with torch.no_grad():
        with afkern.route(m, fusion=route):
            before = m(ids, attention_mask=mask).last_hidden_state
        with afkern.fusion_control(m, zero=["a", "c"], fusion="rev"):
            with afkern.route(m, fusion=route):
                zeroed = m(ids, attention_mask=mask).last_hidden_state
        blocks = [n for n, _ in afkern.fused_blocks(m)]
        afkern.prune_fusion(m, "rev", {blocks[0]: ["d", "b"], blocks[1]: ["b", "d"]})
        assert next(afkern.fused_blocks(m))[1].fusions["rev"].adapter_names == ["d", "b"]  # the fusion's order
        with afkern.route(m, fusion=route):
            after = m(ids, attention_mask=mask).last_hidden_state
        assert rel_err(after, zeroed) < 1e-9
        keep = [0, 2, 3]
        assert rel_err(after[keep], before[keep]) < 1e-12  # the other fusions' sequences did not move
        with pytest.raises(ValueError, match="not in fusion 'rev'"):
            afkern.prune_fusion(m, "rev", ["a"])


def test_fusion_regularization_loss_per_fusion():
    m = _tiny_bert(PLAIN)
    total = afkern.fusion_regularization_loss(m)
    parts = sum(afkern.fusion_regularization_loss(m, f) for f in afkern.fusion_names(m))
    assert rel_err(total, parts) < 1e-12
    assert afkern.fusion_regularization_loss(m, "sub") == 0  # static: no value matrix


def test_bad_input_raises_and_changes_nothing():
    m = _tiny_bert(PLAIN)
    ids, mask = _batch(B=3)
    state = copy.deepcopy(m.state_dict())
    names = afkern.fusion_names(m)
    with pytest.raises(ValueError, match="unknown fusion 'nope'"):
        with afkern.route(m, fusion=["tri", "nope", "sub"]):
            pass
    with pytest.raises(ValueError, match="index 9 out of range"):
        with afkern.route(m, fusion=["tri", 9, "sub"]):
            pass
    with pytest.raises(ValueError, match="route has 2 entries but the batch has 3 sequences"):
        with afkern.route(m, fusion=["tri", "sub"]):
            m(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="exactly one of"):
        with afkern.route(m, fusion=["tri"], adapter=["a"]):
            pass
    with pytest.raises(TypeError, match="one fusion per sequence"):
        with afkern.route(m, fusion="tri"):
            pass
    with pytest.raises(ValueError, match="lacks"):
        afkern.add_fusion(m, "bad", ["a", "zz"])
    with pytest.raises(ValueError, match="already has a fusion named 'tri'"):
        afkern.add_fusion(m, "tri", ["a", "b"])
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        with afkern.route(m, adapter=["a", "zz", "b"]):
            pass
    assert afkern.fusion_names(m) == names
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    # after the errors, routing works and no route is left active
    with torch.no_grad():
        out = m(ids, attention_mask=mask).last_hidden_state
        assert_f64("after the errors", out, _alone(m, ids, mask, [next(afkern.fused_blocks(m))[1].active_fusion] * 3))

    from transformers import BertConfig, BertModel

    single = BertModel(BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    afkern.patch_bert(single, ["x", "y"], fusion_config=False)
    with pytest.raises(ValueError, match="the model has none"):
        with afkern.route(single, fusion=["x"]):
            pass
    with pytest.raises(ValueError, match="no FusedAdapterBlock"):
        with afkern.route(BertModel(single.config), fusion=["x"]):
            pass


def test_route_covers_only_its_model_and_nests():
    m1, m2 = _tiny_bert(PLAIN), _tiny_bert(PLAIN, seed=1)
    ids, mask = _batch(B=2)
    with torch.no_grad():
        afkern.set_active_fusion(m2, "sub")
        plain2 = m2(ids, attention_mask=mask).last_hidden_state
        want = _alone(m2, ids, mask, ["tri", "sub"])
        afkern.set_active_fusion(m2, "sub")
        with afkern.route(m1, fusion=["tri", "sub"]):
            assert_same("a model outside the route", m2(ids, attention_mask=mask).last_hidden_state, plain2)
            with afkern.route(m2, fusion=["tri", "sub"]):
                assert_f64("nested route", m2(ids, attention_mask=mask).last_hidden_state, want)
            assert_same("after the nested route", m2(ids, attention_mask=mask).last_hidden_state, plain2)


# ----------------------------------------------------------------------------------- backends
def _layer_case(b, route, grad, dtype, device="cpu"):
    """(h, x, P, spec, plan) of one routed layer of block ``b`` (on ``device``) on a per-token route."""
    g = torch.Generator().manual_seed(5)
    T = len(route)
    h = torch.randn(T, 24, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(grad)
    x = torch.randn(T, 24, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(grad)
    names = list(b.fusions)
    plan = route_plan([names.index(r) for r in route], names, 1, device)
    spec = routed_spec(b, b.fusions[plan.names[0]])
    return h, x, block_params(b), spec, plan


@pytest.mark.parametrize("which", ["cuda_prims", "triton"])
@pytest.mark.parametrize("grad", [False, True])
def test_kernel_backends_routed_layer_match_reference(which, grad):
    """float32 against the float64 oracle: error at most 2x the torch path's + a small floor."""
    from afkern.backends import reference, torch_ops

    if which == "triton":
        pytest.importorskip("triton")
        from afkern.backends import triton_ops as mod
    else:
        from afkern.backends import cuda_ops as _c

        mod = type("M", (), {"layer": staticmethod(
            lambda h, x, P, spec, plan: fusion_layer(h, x, P, spec, _c.PRIMITIVES, plan=plan))})
    b64 = _block()
    b32 = copy.deepcopy(b64).float()
    route = ["tri", "sub", "a,b,c,d", "qbl", "rb", "tri", "rev", "hot", "sub", "tri", "rb", "qbl", "sub"]

    def run(block, dtype, layer, with_params=False, device="cpu"):
        block = block.to(device)
        h, x, P, spec, plan = _layer_case(block, route, grad, dtype, device)
        for f in block.fusions.values():
            f.temperature = 7.0 if f.config.temperature else 1.0
        fold = not grad
        with torch.set_grad_enabled(grad):
            fs = segments(block, plan, device, fold, with_params=with_params)
            out, p = layer(h, x, P, spec, plan=SegmentPlan(plan, fs))
            grads = None
            if grad:
                w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
                leaves = [h, x, block.down_weight, block.up_weight, block.fusions["tri"].query.weight,
                          block.fusions["rb"].value.weight, block.fusions["qbl"].key.weight, block.LayerNorm.weight]
                grads = [t.cpu() for t in torch.autograd.grad((out * w.to(device)).sum(), leaves)]
        return out.detach().cpu(), p.detach().cpu(), grads

    ref = run(b64, torch.float64, reference.layer, with_params=True)
    fast64 = run(b64, torch.float64, torch_ops.layer)
    assert rel_err(fast64[0], ref[0]) < 1e-9 and rel_err(fast64[1], ref[1]) < 1e-9
    base = run(b32, torch.float32, torch_ops.layer)
    got = run(copy.deepcopy(b32), torch.float32, mod.layer, device=KDEV)
    for a, bb, r in [(got[0], base[0], ref[0]), (got[1], base[1], ref[1])] + (
            list(zip(got[2], base[2], ref[2])) if grad else []):
        judge(f"{mod.__name__} routed layer", a, bb, r)


def test_triton_routed_adapter_layer_matches_torch():
    pytest.importorskip("triton")
    from afkern.backends import torch_ops, triton_ops

    b = _block(dtype=torch.float32)
    route = ["c", "a", "a", "d", "c", "b", "a"]
    plan = route_plan([ADAPTERS.index(r) for r in route], ADAPTERS, 1, "cpu")
    plan_k = route_plan([ADAPTERS.index(r) for r in route], ADAPTERS, 1, KDEV)
    bk = copy.deepcopy(b).to(KDEV)
    adapters = [ADAPTERS.index(n) for n in plan.names]
    spec = single_spec(b, adapters[0])
    g = torch.Generator().manual_seed(2)
    h = torch.randn(7, 24, generator=g, requires_grad=True)
    x = torch.randn(7, 24, generator=g)
    outs = []  # torch float32 (the baseline), triton float32, torch float64 (the truth)
    for mod, blk, pl, dev, dt in ((torch_ops, b, plan, "cpu", torch.float32), (triton_ops, bk, plan_k, KDEV, torch.float32),
                                  (torch_ops, copy.deepcopy(b).double(), plan, "cpu", torch.float64)):
        hd = h.detach().to(dev, dt).requires_grad_(True)
        o, _ = mod.layer(hd, x.to(dev, dt), block_params(blk), spec, plan=SegmentPlan(pl, adapter_segments(spec, adapters)))
        gh, gw = torch.autograd.grad(o.pow(2).sum(), [hd, blk.up_weight])
        outs.append((o.cpu(), gh.cpu(), gw.cpu()))
    for what, c, a, t in zip(("out", "d hidden", "d up_weight"), *outs):
        judge(f"triton routed adapter layer: {what}", a, c, t)


@pytest.mark.parametrize("T_codes", [[0], [2, 0, 1, 1, 0, 2, 2], [1] * 5 + [0] * 3])
@pytest.mark.parametrize("seq_len", [1, 5, 19])
def test_segmented_gemm_kernel_matches_torch(T_codes, seq_len):
    pytest.importorskip("triton")
    from afkern.kernels.segmented import seg_mm_triton

    plan = route_plan(T_codes, ["a", "b", "c"], seq_len, KDEV)
    g = torch.Generator().manual_seed(0)
    K, N, S = 37, 45, len(plan.bounds)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(KDEV).requires_grad_(True)  # noqa: E731
    x = rnd(plan.tokens, K)
    W = [rnd(K, N) for _ in range(S)]
    bias = [rnd(N) if i % 2 == 0 else None for i in range(S)]
    base = rnd(plan.tokens, N)
    gout = torch.randn(plan.tokens, N, generator=g).to(KDEV)
    leaves = [x, *W, *[v for v in bias if v is not None], base]
    res = []
    for fn in (seg_mm_torch, seg_mm_triton):
        out = fn(x, [w.t().contiguous().t() if i == 0 else w for i, w in enumerate(W)], plan, bias, base)
        res.append((out, torch.autograd.grad(out, leaves, gout)))
    # the truth: torch's segmented GEMM on float64 copies of the same leaves
    as64 = lambda t: None if t is None else t.detach().cpu().double().requires_grad_(True)  # noqa: E731
    x64, W64, bias64, base64 = as64(x), [as64(w) for w in W], [as64(v) for v in bias], as64(base)
    plan64 = route_plan(T_codes, ["a", "b", "c"], seq_len, "cpu")
    out64 = seg_mm_torch(x64, W64, plan64, bias64, base64)
    g64 = torch.autograd.grad(out64, [x64, *W64, *[v for v in bias64 if v is not None], base64], gout.cpu().double())
    judge("segmented GEMM", res[1][0].cpu(), res[0][0].cpu(), out64)
    for i, (a, c, t) in enumerate(zip(res[1][1], res[0][1], g64)):
        judge(f"segmented GEMM gradient {i}", a.cpu(), c.cpu(), t)
    # an identity segment (None weight) and no-grad output buffer path
    with torch.no_grad():
        a = seg_mm_torch(x, [None] * S, plan, base=base[:, :K])
        c = seg_mm_triton(x, [None] * S, plan)
    assert_same("identity segments plus base", a, x + base[:, :K])
    assert_same("identity segments", c, x)


def test_route_plan_reused_across_sequence_lengths_and_batch_shapes():
    """One route over forwards of several lengths (in one ``route()`` and in a later one with the
    same route, whose plans are shared): each forward equals each sequence alone, so no plan built
    for one shape is reused for another."""
    m = _tiny_bert(PLAIN)
    route = ["tri", "sub", "tri", "rev"]
    outs = []
    with afkern.route(m, fusion=route):
        for S in (5, 9, 3):
            ids, mask = _batch(B=4, S=S, seed=S)
            outs.append((ids, mask, m(ids, attention_mask=mask).last_hidden_state))
    with afkern.route(m, fusion=route):
        for S in (9, 5):
            ids, mask = _batch(B=4, S=S, seed=S + 1)
            outs.append((ids, mask, m(ids, attention_mask=mask).last_hidden_state))
    with afkern.route(m, fusion=route[:3]):  # another batch size, the same length as before
        ids, mask = _batch(B=3, S=9, seed=2)
        outs.append((ids, mask, m(ids, attention_mask=mask).last_hidden_state))
    for ids, mask, out in outs:
        want = _alone(m, ids, mask, route[:ids.shape[0]])
        assert rel_err(out, want) < 1e-9, f"batch {tuple(ids.shape)}: {rel_err(out, want):.3g}"


# ----------------------------------------------------------------------------------- mixed kinds
MIXED_CASES = [(n, p) for n in ("bert", "gpt2") for p in ("pfeiffer", "houlsby")]  # a swap and a hooked family


@pytest.mark.parametrize("name,placement", MIXED_CASES, ids=[f"{n}-{p}" for n, p in MIXED_CASES])
def test_setup_route_mixes_fusions_and_adapters_each_sequence_alone(name, placement):
    """route(setup=[...]): each sequence through its own fusion or single adapter, kinds mixed in
    one batch, equals that sequence run alone with its setup active (float64, masks, padding)."""
    import test_parallel as TP

    spec, model = TP._model(name, placement)
    B = 5
    inputs = TP.F.cast_inputs(TP.F.make_inputs(spec, batch=B, pad_from=3), torch.float64)
    inputs["attention_mask"][1, 4:] = 0
    setup = ["f_sub", "b", "f_all", "b", "c"]
    afkern.set_active_fusion(model, "f_all")
    with torch.no_grad():
        with afkern.route(model, setup=setup):
            got = TP._first(model(**inputs))
        want = torch.cat([TP._alone(model, s, {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in inputs.items()})
                          for i, s in enumerate(setup)])
    assert rel_err(got, want) < 1e-9
    # the rows of different setups differ: the test sees a wrong route
    other = torch.cat([TP._alone(model, "a", {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in inputs.items()})
                       for i in range(B)])
    assert all(rel_err(got[i], other[i]) > 1e-4 for i in range(B))
    # one kind only is the plain routed path (no "mixed" state)
    with torch.no_grad(), afkern.route(model, setup=["c", "a", "b", "a", "c"]):
        only = TP._first(model(**inputs))
    with torch.no_grad(), afkern.route(model, adapter=["c", "a", "b", "a", "c"]):
        torch.testing.assert_close(only, TP._first(model(**inputs)), rtol=0, atol=0)


def test_setup_route_gradients_reach_each_setup_from_its_own_sequences():
    m = _tiny_bert(PLAIN).train()
    ids, mask = _batch(B=4)
    setup = ["tri", "a", "sub", "a"]
    w = torch.randn(4, 9, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    temps = _temperatures(m)
    with afkern.route(m, setup=setup):
        out = m(ids, attention_mask=mask).last_hidden_state
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    outs = []
    for i, s in enumerate(setup):
        _set_temperatures(m, temps)
        (afkern.set_active_fusion if s in afkern.fusion_names(m) else afkern.set_active_adapter)(m, s)
        o = m(ids[i:i + 1], attention_mask=mask[i:i + 1]).last_hidden_state
        (o * w[i:i + 1]).sum().backward()
        outs.append(o.detach())
    assert rel_err(out, torch.cat(outs)) < 1e-9
    ref = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(ref) and any("fusions.rev" in n for n in dict(m.named_parameters()))
    assert not any("fusions.rev" in n for n in grads)  # "rev" routes no sequence: no gradient
    scale = max(float(g.abs().max()) for g in ref.values())
    for n in ref:  # relative per tensor; a gradient that is zero in exact arithmetic (a key bias) at scale
        floor = max(float(ref[n].abs().max()), 1e-6 * scale)
        assert float((grads[n] - ref[n]).abs().max()) <= 1e-9 * floor, n
    assert grads["encoder.layer.1.output.fusions.tri.query.weight"].abs().max() > 0


def test_setup_route_bad_input_and_names_that_are_both():
    m = _tiny_bert(PLAIN)
    afkern.add_fusion(m, "a", ["a", "b"])  # "a" now names an adapter and a fusion
    ids, mask = _batch(B=2)
    state = copy.deepcopy(m.state_dict())
    for kw, err, exc in ((dict(setup=["tri", "nope"]), "unknown setup 'nope'", ValueError),
                         (dict(setup=["a", "tri"]), "names both a fusion and an adapter.*'fusion:a' or 'adapter:a'",
                          ValueError),
                         (dict(setup=[0, "tri"]), "names \\(str\\)", TypeError),
                         (dict(setup=[]), "route is empty", ValueError),
                         (dict(setup="tri"), "one setup per sequence", TypeError),
                         (dict(setup=["tri"], fusion=["tri"]), "exactly one of", ValueError),
                         (dict(setup=["fusion:zz"]), "unknown setup 'fusion:zz'", ValueError)):
        with pytest.raises(exc, match=err):
            with afkern.route(m, **kw):
                pass
    with pytest.raises(ValueError, match="route has 3 entries but the batch has 2 sequences"):
        with afkern.route(m, setup=["tri", "b", "c"]):
            m(ids, attention_mask=mask)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the prefixes spell either kind of "a"
    with torch.no_grad():
        with afkern.route(m, setup=["fusion:a", "adapter:a"]):
            out = m(ids, attention_mask=mask).last_hidden_state
        afkern.set_active_fusion(m, "a")
        r0 = m(ids[:1], attention_mask=mask[:1]).last_hidden_state
        afkern.set_active_adapter(m, "a")
        r1 = m(ids[1:], attention_mask=mask[1:]).last_hidden_state
    assert rel_err(out, torch.cat([r0, r1])) < 1e-9
