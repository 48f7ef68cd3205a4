"""Gradient checkpointing of patched models (issue 13 item 2), with an annealed fusion temperature
(``FusionConfig(temperature=True)``) and score dropout.

transformers 4.x checkpoints with ``use_reentrant=True`` by default (the layer's forward runs under
no_grad, then again inside backward), 5.x with ``use_reentrant=False`` (the forward runs once with
grad, its activations are recomputed inside backward). Either way a fused block runs twice per
training step. The temperature must move once per forward of the model, and the recomputation must
see the temperature and the score-dropout mask of the forward it recomputes; then the gradients are
those without checkpointing. Runs on transformers 4.57 here and on 5.x (scripts/test_tf5.sh).
"""

from __future__ import annotations

import copy

import pytest
import torch

import afkern
from afkern import FusedAdapterBlock
from afkern.fusion import T_START, AdapterFusion

from conftest import perturb_, token_batch
from parity import assert_same

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEP = T_START / 1000.0
KINDS = ["default", "reentrant", "non_reentrant"]  # default: what this transformers version does


def _bert(seed=0, dropout=0.1):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=40, num_hidden_layers=3, num_attention_heads=4, intermediate_size=72, vocab_size=97,
                     max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                     num_labels=3)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg)
    afkern.patch_model(model, ["a", "b", "c"], adapter_config=afkern.AdapterConfig.houlsby(),
                       fusion_config=afkern.FusionConfig(temperature=True))
    perturb_(model, 0.2, seed=seed)
    # fusion training: the base model and the adapters frozen; the fusions and the head train
    for n, p in model.named_parameters():
        p.requires_grad_(".fusions." in n or n.startswith("classifier."))
    return model.train()


def _enable(model, kind):
    kwargs = None if kind == "default" else {"use_reentrant": kind == "reentrant"}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # reentrant checkpointing needs an input that requires grad; the embeddings are frozen
    model.enable_input_require_grads()
    return model


def _fusions(model):
    return [m for m in model.modules() if isinstance(m, AdapterFusion)]


def _step(model, opt, batch, seed):
    torch.manual_seed(seed)  # the same dropout masks for both models
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_training_equals_plain_training(kind, backend):
    plain, ckpt = _bert(), _enable(_bert(), kind)
    for m in (plain, ckpt):
        afkern.set_backend(m, backend)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())
    batch = dict(token_batch(4, 11, 6, seed=1), labels=torch.tensor([0, 1, 2, 1]))
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (plain, ckpt)]
    for step in range(3):
        (loss_p, g_p), (loss_c, g_c) = (_step(m, o, batch, seed=100 + step) for m, o in zip((plain, ckpt), opts))
        # the recomputation runs the same ops on the same values: the same bits
        assert_same("checkpointed loss", loss_c, loss_p)
        assert any(".fusions." in n for n in g_p)
        assert_same("checkpointed gradients", g_c, g_p)
        # the temperature moved exactly once per forward of the model, with and without checkpointing
        for m in (plain, ckpt):
            assert all(f.temperature == pytest.approx(T_START - STEP * (step + 1)) for f in _fusions(m))
    # an eval forward moves it once too (AdapterHub anneals in eval as well)
    ckpt.eval()
    with torch.no_grad():
        ckpt(**batch)
    assert all(f.temperature == pytest.approx(T_START - STEP * 4) for f in _fusions(ckpt))


class _SharedLayer(torch.nn.Module):
    """One block called at every depth, as ALBERT's shared layer calls its fusion (ALBERT itself
    does not support gradient checkpointing in transformers; torch's checkpoint is used directly)."""

    def __init__(self, kind, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.block = FusedAdapterBlock(24, ["a", "b", "c"], fusion_config=afkern.FusionConfig(temperature=True,
                                                                                               dropout_prob=0.3))
        perturb_(self.block, 0.3, seed=seed)
        self.block.freeze_adapters()
        self.kind = kind

    def forward(self, hs, x):
        for _ in range(3):
            if self.kind is None:
                x = self.block(hs, x)
            else:
                x = torch.utils.checkpoint.checkpoint(self.block, hs, x, use_reentrant=self.kind == "reentrant")
        return x


@pytest.mark.parametrize("kind", ["reentrant", "non_reentrant"])
def test_shared_layer_calls_anneal_per_call_and_recompute_their_own_temperature(kind):
    """AdapterHub anneals a fusion at each call, so a shared layer's 3 calls per forward use 3
    temperatures; each call's recomputation inside backward (last call first) must see its own."""
    from afkern.fusion import attach_temperature_clock

    plain, ckpt = (attach_temperature_clock(_SharedLayer(k).train()) for k in (None, kind))
    hs = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(4))
    for step in range(2):
        grads = []
        for m in (plain, ckpt):
            torch.manual_seed(300 + step)  # the same score-dropout masks
            hs.grad = None
            (m(hs, x) * torch.linspace(-1, 1, 24)).sum().backward()
            grads.append([hs.grad.clone()] + [p.grad.clone() for p in m.block.fusion.parameters()])
            m.block.zero_grad()
        for gc, gp in zip(*reversed(grads)):
            assert_same("checkpointed shared layer gradient", gc, gp)
        for m in (plain, ckpt):
            assert m.block.temperature == pytest.approx(T_START - 3 * STEP * (step + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_recomputation_sees_the_forwards_temperature_and_dropout_mask(kind, monkeypatch):
    """Every block runs twice in a checkpointed step (forward, recomputation); both runs use one
    temperature and one score-dropout mask."""
    model = _enable(_bert(), kind)
    seen = {}
    orig = FusedAdapterBlock.adapter_forward

    def spy(block, h, residual_input):
        fusion = block.fusion
        t_before = fusion.temperature
        masks = []
        real = block.score_dropout_scale

        def record(*a, **k):
            masks.append(real(*a, **k))
            return masks[-1]

        monkeypatch.setattr(block, "score_dropout_scale", record)
        try:
            out = orig(block, h, residual_input)
        finally:
            monkeypatch.delattr(block, "score_dropout_scale")
        seen.setdefault(id(block), []).append((t_before, fusion.temperature, masks[0]))
        return out

    monkeypatch.setattr(FusedAdapterBlock, "adapter_forward", spy)
    batch = dict(token_batch(4, 11, 6, seed=2), labels=torch.tensor([0, 1, 2, 1]))
    for step in range(2):
        seen.clear()
        torch.manual_seed(step)
        # non-reentrant recomputation stops once the tensors the backward needs are back, which
        # can be before a layer's last block; recompute whole layers so every block is checked
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            model(**batch).loss.backward()
        assert len(seen) == 6  # 3 layers x (attention, output) sites
        for runs in seen.values():
            assert len(runs) == 2, "a checkpointed block runs in the forward and in the recomputation"
            (_, t_after_fwd, mask_fwd), (_, t_after_rec, mask_rec) = runs
            assert t_after_fwd == t_after_rec == pytest.approx(T_START - STEP * (step + 1))
            assert torch.equal(mask_fwd, mask_rec) and 0 < (mask_fwd == 0).sum() < mask_fwd.numel()


def test_temperature_used_by_a_forward_is_fixed_for_its_recomputation():
    """The score of a checkpointed step is computed at the temperature of that step's forward: a
    step's loss and gradients are those of the plain model at the same temperature, also when the
    temperature is set between the forward and the backward."""
    plain, ckpt = _bert(dropout=0.0), _enable(_bert(dropout=0.0), "default")
    batch = dict(token_batch(4, 11, 6, seed=3), labels=torch.tensor([2, 1, 0, 1]))
    losses = []
    for m in (plain, ckpt):
        for f in _fusions(m):
            f.temperature = 3.0
        loss = m(**batch).loss
        for f in _fusions(m):
            f.temperature = 40.0  # a change between forward and backward is for the next forward
        loss.backward()
        losses.append(loss.detach())
    assert_same("checkpointed loss", losses[1], losses[0])
    gp = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert_same("checkpointed gradients", {n: p.grad for n, p in ckpt.named_parameters() if p.grad is not None}, gp)


def test_training_mode_no_grad_forward_does_not_fold_trainable_weights():
    """Reentrant checkpointing runs the training forward under no_grad: it must compute what its
    recomputation computes (unfolded), not fold the trainable weights anew at every step."""
    model = _bert(dropout=0.0)
    with torch.no_grad():
        model(**token_batch(2, 7, 5))
    assert all(b.cached_folded() is None for _, b in afkern.fused_blocks(model))
    model.eval()
    with torch.no_grad():
        model(**token_batch(2, 7, 5))
    assert all(b.cached_folded() is not None for _, b in afkern.fused_blocks(model))


def test_standalone_block_anneals_on_every_forward():
    """A block used without a patched model keeps AdapterHub's per-forward annealing."""
    b = FusedAdapterBlock(24, ["a", "b"], fusion_config=afkern.FusionConfig(temperature=True), in_features=24).eval()
    with torch.no_grad():
        for k in range(3):
            b(torch.randn(5, 24), torch.randn(5, 24))
            assert b.temperature == pytest.approx(T_START - STEP * (k + 1))


def test_copies_and_reloads_keep_the_clock():
    """A deep copy of a patched model (and a model rebuilt by drop_adapters) still moves the
    temperature once per model forward, under checkpointing too."""
    model = _enable(_bert(), "default")
    twin = copy.deepcopy(model)
    batch = dict(token_batch(2, 7, 5), labels=torch.tensor([0, 1]))
    twin(**batch).loss.backward()
    assert all(f.temperature == pytest.approx(T_START - STEP) for f in _fusions(twin))
    assert all(f.temperature == T_START for f in _fusions(model))
    afkern.drop_adapters(twin, ["c"])
    twin(**batch).loss.backward()
    assert all(f.temperature == pytest.approx(T_START - 2 * STEP) for f in _fusions(twin))
