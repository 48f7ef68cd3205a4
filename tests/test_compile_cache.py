"""The per-forward caches of the decode path see every change (afkern/compiler.py
``_compile_active``; afkern/fusion.py ``fusions_of``).

At inference a block caches its whole compiled active setup (backend, params, spec, folded
weights, plan) keyed on what the compile reads, and a model caches the list of its fusions for
the temperature clock. Each test changes one thing the cache must notice and compares the next
forward with the same forward after every cache was dropped (``invalidate_folded``), which
recompiles from scratch: the two must be equal bit for bit, and the change must move the output
(so a stale cache fails the test).
"""

import copy

import pytest
import torch
import torch.nn as nn

import afkern
from afkern import FusedAdapterBlock, FusionConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D = 24


def _block(**kw):
    torch.manual_seed(0)
    b = FusedAdapterBlock(D, ["a", "b", "c"], in_features=40, backend="torch", **kw).double().eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    b.add_fusion("ab", ["a", "b"])
    with torch.no_grad():
        for p in b.fusions["ab"].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return b


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 40, generator=g, dtype=torch.float64), torch.randn(2, 5, D, generator=g, dtype=torch.float64)


def _fresh(b, h, x):
    b.invalidate_folded()
    return b(h, x)


def _change_weight(b):
    with torch.no_grad():
        b.fusions[b.active_fusion].query.weight.mul_(1.5)  # in place: the version counter moves


def _replace_param(b):
    f = b.fusions[b.active_fusion]
    f.key.weight = nn.Parameter(f.key.weight.detach() * -1.0)  # a new tensor: new storage


def _adapter_weight(b):
    with torch.no_grad():
        b.up_weight[0].mul_(2.0)


def _switch_fusion(b):
    b.set_active_fusion("ab")


def _single_adapter(b):
    b.set_active_adapter("b")


def _config_edit(b):
    b.fusions[b.active_fusion].config.residual_before = True  # the spec reads the config


def _adapter_config_edit(b):
    b.adapter_config.residual_before_ln = False


CHANGES = {
    "weight_in_place": _change_weight, "new_parameter": _replace_param, "adapter_weight": _adapter_weight,
    "active_fusion": _switch_fusion, "single_adapter": _single_adapter, "fusion_config": _config_edit,
    "adapter_config": _adapter_config_edit,
}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_cached_compile_sees_the_change(change, grad):
    b = _block()
    h, x = _inputs()
    with torch.set_grad_enabled(grad):
        before = b(h, x).detach()
        again = b(h, x).detach()  # served from the cache
        assert torch.equal(before, again)
        CHANGES[change](b)
        got = b(h, x).detach()
        want = _fresh(b, h, x).detach()
    assert torch.equal(got, want), f"{change}: the cached compile ran the old setup"
    assert (got - before).abs().max() > 1e-6, f"{change}: the change did not move the output (test is void)"


def test_cached_compile_follows_backend_and_train_mode():
    b = _block()
    h, x = _inputs()
    with torch.no_grad():
        torch_out = b(h, x)
        b.set_backend("reference")
        ref = b(h, x)
    assert b.resolved_backend() == "reference"
    assert (ref - torch_out).abs().max() < 1e-9  # the same function in float64
    torch.manual_seed(3)
    b.train()
    b.fusions[b.active_fusion].score_dropout = 0.5
    with torch.no_grad():
        drawn = [b(h, x) for _ in range(2)]
    assert not torch.equal(drawn[0], drawn[1]), "score dropout must be drawn per forward, not cached"


def test_requires_grad_toggle_unfolds():
    """With grad enabled in eval, a fusion whose weights now require grad must run unfolded, so the
    gradient reaches them."""
    b = _block()
    h, x = _inputs()
    for p in b.parameters():
        p.requires_grad_(False)
    with torch.enable_grad():
        b(h, x)  # cached folded: nothing needs a gradient
        q = b.fusions[b.active_fusion].query.weight
        q.requires_grad_(True)
        b(h, x).sum().backward()
    assert q.grad is not None and q.grad.abs().max() > 0


def test_control_is_read_per_forward():
    """A control set after cached forwards takes effect at the next one, and clearing it restores
    the plain fusion."""
    b = _block()
    h, x = _inputs()
    with torch.no_grad():
        plain = b(h, x)
        b.fusion_control = afkern.FusionControl(log_prior=torch.tensor([0.0, -2.0, 3.0], dtype=torch.float64))
        ctl = b(h, x)
        b.fusion_control = None
        back = b(h, x)
    assert (ctl - plain).abs().max() > 1e-6
    assert torch.equal(back, plain)


def _annealed_model():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    m = BertModel(cfg).eval()
    afkern.patch_model(m, ["a", "b"], afkern.AdapterConfig.pfeiffer(), FusionConfig(temperature=True))
    return m


def test_temperature_clock_sees_a_fusion_added_later():
    """The model's fusion list is cached for the temperature clock; a fusion added after forwards
    anneals from its first forward, and one in a deep copy anneals in the copy only."""
    m = _annealed_model()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        m(ids)
        afkern.add_fusion(m, "late", ["b", "a"], FusionConfig(temperature=True))
        afkern.set_active_fusion(m, "late")
        blocks = [b for _, b in afkern.fused_blocks(m)]
        t0 = [b.fusions["late"].temperature for b in blocks]
        m(ids)
        t1 = [b.fusions["late"].temperature for b in blocks]
        assert all(a > b for a, b in zip(t0, t1)), (t0, t1)
        assert all(f._step_temps == [a] for f, a in zip((b.fusions["late"] for b in blocks), t0))
        c = copy.deepcopy(m)
        c(ids)
    copies = [b.fusions["late"] for _, b in afkern.fused_blocks(c)]
    assert all(f._step_temps == [t] for f, t in zip(copies, t1))
    assert all(b.fusions["late"].temperature == t for b, t in zip(blocks, t1)), "the copy's forward annealed the original"


def test_spec_is_one_object_per_setup_and_follows_config_edits():
    """``block_spec`` interns its LayerSpec (one object per distinct setup, so the compile key
    compares it by identity): the same setup gives the same object, an edited config a new one
    with the edit in it, and an equal setup of another block the same object."""
    b = _block()
    b.set_active_fusion("ab")
    s1, s2 = b.spec(), b.spec()
    assert s1 is s2
    assert _block().set_active_fusion("ab").spec() is s1
    b.fusions["ab"].config.residual_before = not s1.residual_before
    s3 = b.spec()
    assert s3 is not s1 and s3.residual_before == (not s1.residual_before)
    b.fusions["ab"].config.residual_before = s1.residual_before
    assert b.spec() is s1


def test_routed_folds_see_a_config_edit():
    """The folds of a routed batch (``compiler.routed_folds``) are keyed on each fusion's spec
    too: an edited fusion config refolds, as the active setup's fold does."""
    b = _block()
    with torch.no_grad():
        b.add_fusion("ac", ["a", "c"])
        for p in b.fusions["ac"].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    h, x = _inputs()
    with torch.no_grad():
        with afkern.route(b, fusion=["ab", "ac"]):
            before, again = b(h, x), b(h, x)
        assert torch.equal(before, again)
        b.fusions["ab"].config.residual_before = True
        with afkern.route(b, fusion=["ab", "ac"]):
            got = b(h, x)
            b.invalidate_folded()
            want = b(h, x)
    assert torch.equal(got, want), "the routed batch ran the folds of the old config"
    assert (got[0] - before[0]).abs().max() > 1e-6, "the edit did not move the edited fusion's sequence (void)"
    # the other fusion's sequence is unchanged up to float64 rounding (the batch now takes the
    # residual_before path, which runs every segment's residual term through a GEMM)
    assert (got[1] - before[1]).abs().max() < 1e-12
