"""Fusion weights per layer (afkern.record_fusion_weights / fusion_weights) and the heatmap."""

import copy

import pytest
import torch

import afkern
from conftest import perturb_
from parity import assert_rounding_bound


def _model():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                     vocab_size=97, max_position_embeddings=64)
    m = BertModel(cfg).eval().double()
    afkern.patch_bert(m, ["a", "b", "c"], "houlsby", "dynamic", backend="torch")
    return perturb_(m, 0.3)


def _batch():
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


def test_recorded_weights_match_reference_and_masked_mean():
    m = _model()
    ref = afkern.set_backend(copy.deepcopy(m), "reference")
    ids, mask = _batch()
    for mod in (m, ref):
        afkern.record_fusion_weights(mod)
        with torch.no_grad():
            mod(input_ids=ids, attention_mask=mask)
    blocks, ref_blocks = dict(afkern.fused_blocks(m)), dict(afkern.fused_blocks(ref))
    assert len(blocks) == 4
    for name, b in blocks.items():
        w = b.fusion_weights
        assert w.shape == (2, 11, 3) and not w.requires_grad
        # 3 probabilities (each from an exp, a sum and a division) summed: ~8 roundings a row
        assert_rounding_bound("fusion weights' row sums", w.sum(-1), torch.ones(2, 11), terms=8)
        torch.testing.assert_close(w, ref_blocks[name].fusion_weights.to(w.dtype), atol=1e-10, rtol=1e-9)
        assert w.std(dim=(0, 1)).max() > 1e-3  # token-dependent, not a constant
    plain = afkern.fusion_weights(m)
    masked = afkern.fusion_weights(m, mask=mask)
    assert set(plain) == set(masked) == set(blocks)
    for name, b in blocks.items():
        w = b.fusion_weights
        want = torch.cat([w[0], w[1, :4]]).mean(0)  # the 15 real tokens
        torch.testing.assert_close(masked[name], want)
        torch.testing.assert_close(plain[name], w.reshape(-1, 3).mean(0))
        assert (masked[name] - plain[name]).abs().max() > 1e-6  # padding would have changed the mean
    with pytest.raises(ValueError, match="does not match"):
        afkern.fusion_weights(m, mask=mask[:, :5])
    afkern.record_fusion_weights(m, enabled=False)
    assert afkern.fusion_weights(m) == {}


def test_recording_off_by_default_and_under_grad():
    m = _model()
    ids, mask = _batch()
    m(input_ids=ids, attention_mask=mask)
    assert afkern.fusion_weights(m) == {}
    afkern.record_fusion_weights(m)
    out = m(input_ids=ids, attention_mask=mask).last_hidden_state  # autograd (unfolded) path
    out.sum().backward()
    assert all(not w.requires_grad for w in afkern.fusion_weights(m).values())


def test_plot_fusion_weights_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    m = _model()
    ids, mask = _batch()
    afkern.record_fusion_weights(m)
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask)
    path = tmp_path / "sub" / "fusion.png"
    out = afkern.plot_fusion_weights(afkern.fusion_weights(m, mask=mask), ["a", "b", "c"], str(path), title="tiny")
    assert out == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert not [p for p in path.parent.iterdir() if p.name != "fusion.png"]  # atomic: no temp file left
    with pytest.raises(ValueError, match="no fusion weights"):
        afkern.plot_fusion_weights({}, ["a"], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="3 adapters but 2 names"):
        afkern.plot_fusion_weights(afkern.fusion_weights(m), ["a", "b"], str(tmp_path / "y.png"))
