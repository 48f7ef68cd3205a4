"""Whole-model save and reload (issue 13 item 3): ``save_pretrained`` / ``Trainer.save_model`` then
``afkern.from_pretrained``; ``afkern.add_adapters``; ``from_adapterhub`` of a single adapter.

A plain ``from_pretrained`` of a patched model's directory drops the adapter keys and returns the
plain model; the saved config records the afkern setup (``config.afkern``) and
``afkern.from_pretrained`` rebuilds the model from it with identical outputs."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import pytest
import torch

import afkern
from afkern.fusion import T_START, AdapterFusion

from conftest import perturb_, token_batch
from parity import assert_same, f64_truth, judge

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**kw):
    from transformers import BertConfig

    kw = {**dict(hidden_size=40, num_hidden_layers=3, num_attention_heads=4, intermediate_size=72, vocab_size=97,
                 max_position_embeddings=64, num_labels=3), **kw}
    return BertConfig(**kw)


def _patched(cls_name="BertForSequenceClassification", seed=0, **cfg_kw):
    """A patched model with everything a setup can hold: Houlsby placement (two sites per layer),
    two fusions (one static, over a subset), an annealed temperature, a block pruned to a subset."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(_config(**cfg_kw))
    afkern.patch_model(model, ["sst", "mnli", "qqp"], adapter_config=afkern.AdapterConfig.houlsby(reduction_factor=5),
                       fusion_config=afkern.FusionConfig(temperature=True))
    afkern.add_fusion(model, "pair", ["qqp", "sst"], afkern.FusionConfig.static(dropout_prob=0.2))
    perturb_(model, 0.2, seed=seed)
    blocks = dict(afkern.fused_blocks(model))
    name = next(n for n in blocks if n.endswith("layer.1.output"))
    afkern.model.replace_blocks(model, {name: blocks[name].select_adapters(["qqp", "sst"])})  # pruned block
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(**token_batch(2, 5, 3))  # anneal the temperature: 50 -> 49.85
    return model


def _save_bin(model, path):
    """save_pretrained in the .bin format (transformers 5 writes safetensors only: convert)."""
    model.save_pretrained(path, safe_serialization=False)
    st = os.path.join(path, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        torch.save(load_file(st), os.path.join(path, "pytorch_model.bin"))
        os.unlink(st)


def _outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _fusions(model):
    return [m for m in model.modules() if isinstance(m, AdapterFusion)]


def test_plain_from_pretrained_loses_the_adapters_and_afkern_restores_them(tmp_path):
    """The issue: transformers alone returns the plain model (adapter keys 'unexpected')."""
    from transformers import BertForSequenceClassification

    model = _patched()
    model.save_pretrained(tmp_path)
    batch = token_batch(3, 9, 5, seed=4)
    plain = BertForSequenceClassification.from_pretrained(tmp_path)
    assert not list(afkern.fused_blocks(plain))
    reloaded = afkern.from_pretrained(tmp_path)
    assert type(reloaded) is BertForSequenceClassification and not reloaded.training
    torch.testing.assert_close(_outputs(reloaded, batch), _outputs(model, batch), rtol=0, atol=0)


def test_saved_config_records_the_setup(tmp_path):
    model = _patched()
    afkern.set_backend(dict(afkern.fused_blocks(model))["bert.encoder.layer.0.output"], "reference")
    afkern.set_active_fusion(model, "pair")
    model.save_pretrained(tmp_path)
    rec = json.load(open(tmp_path / "config.json"))["afkern"]
    assert rec["format"] == 1 and rec["backend"] == "auto"
    assert afkern.AdapterConfig.from_dict(rec["adapter_config"]) == afkern.AdapterConfig.houlsby(reduction_factor=5)
    blocks = rec["blocks"]
    assert sorted(blocks) == sorted(f"encoder.layer.{i}.{s}" for i in range(3) for s in ("attention.output", "output"))
    full, pruned = blocks["encoder.layer.0.output"], blocks["encoder.layer.1.output"]
    assert full["adapters"] == ["sst", "mnli", "qqp"] and pruned["adapters"] == ["qqp", "sst"]
    assert full["backend"] == "reference" and "backend" not in pruned
    f0, f1 = full["fusions"]
    assert (f0["name"], f0["adapters"], f0["config"]["temperature"]) == ("sst,mnli,qqp", ["sst", "mnli", "qqp"], True)
    assert f0["temperature"] == pytest.approx(T_START - 3 * T_START / 1000) and f0["score_dropout"] == 0.1
    assert (f1["name"], f1["adapters"], f1["config"]["value"], f1["score_dropout"]) == ("pair", ["qqp", "sst"], False, 0.2)
    # the pruned block's fusions keep the adapters they had that remain, in their order
    assert [f["adapters"] for f in pruned["fusions"]] == [["sst", "qqp"], ["qqp", "sst"]]
    assert full["active"] == {"fusion": "pair"}


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForSequenceClassification", "BertForMaskedLM"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_from_pretrained_gives_identical_outputs(tmp_path, cls_name, fmt):
    model = _patched(cls_name)
    if fmt == "bin":
        _save_bin(model, tmp_path)
    else:
        model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if fmt == "sharded" else {}))
    files = os.listdir(tmp_path)
    assert ("pytorch_model.bin" in files) == (fmt == "bin") and any(".index.json" in f for f in files) == (fmt == "sharded")
    reloaded = afkern.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == cls_name
    batch = token_batch(3, 9, 5, seed=4)
    torch.testing.assert_close(_outputs(reloaded, batch), _outputs(model, batch), rtol=0, atol=0)
    assert [f.temperature for f in _fusions(reloaded)] == [f.temperature for f in _fusions(model)]
    assert {n: (b.adapter_names, list(b.fusions), b.active_fusion, b.active_adapter)
            for n, b in afkern.fused_blocks(reloaded)} == \
           {n: (b.adapter_names, list(b.fusions), b.active_fusion, b.active_adapter) for n, b in afkern.fused_blocks(model)}
    # and it keeps training as the saved one would: one anneal per model forward, the clock included
    annealed = [f for f in _fusions(reloaded) if f.config.temperature]
    before = [f.temperature for f in annealed]
    reloaded.train()
    reloaded(**token_batch(2, 5, 3))
    assert [f.temperature for f in annealed] == pytest.approx([t - T_START / 1000 for t in before])


def test_single_adapter_setup_bf16_and_backend(tmp_path):
    """A stage-1 model (one active adapter, no fusion) saved in bfloat16; backend=None restores the
    recorded backends, the default is auto."""
    from transformers import BertModel

    torch.manual_seed(0)
    model = afkern.patch_model(BertModel(_config()), ["a", "b"], fusion_config=False, backend="reference")
    afkern.set_active_adapter(model, "b")
    perturb_(model)
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    batch = token_batch(2, 7, 4)
    for backend, want in (("auto", "auto"), (None, "reference")):
        reloaded = afkern.from_pretrained(tmp_path, backend=backend)
        assert next(reloaded.parameters()).dtype == torch.bfloat16
        assert all(b.backend == want and b.active_adapter == "b" and not b.fusions for _, b in afkern.fused_blocks(reloaded))
        afkern.set_backend(reloaded, "reference")
        torch.testing.assert_close(_outputs(reloaded, batch), _outputs(model, batch), rtol=0, atol=0)


def test_trainer_checkpoint_of_base_model_loads_into_head_class(tmp_path):
    """model_class overrides the recorded class (a base model's checkpoint into a head class)."""
    from transformers import BertForSequenceClassification, BertModel

    model = _patched("BertModel")
    model.save_pretrained(tmp_path)
    head = afkern.from_pretrained(tmp_path, model_class=BertForSequenceClassification)
    batch = token_batch(2, 7, 4)
    with torch.no_grad():
        torch.testing.assert_close(head.bert(**batch).last_hidden_state, _outputs(model, batch), rtol=0, atol=0)
    with pytest.raises(TypeError, match="model_class"):
        afkern.from_pretrained(tmp_path, model_class="BertModel")
    assert isinstance(afkern.from_pretrained(tmp_path, model_class=BertModel), BertModel)


def test_live_record_follows_changes_and_copies(tmp_path):
    model = _patched("BertModel")
    twin = copy.deepcopy(model)
    afkern.drop_adapters(twin, ["sst"])
    assert all("sst" not in b["adapters"] for b in twin.config.to_dict()["afkern"]["blocks"].values())
    assert model.config.to_dict()["afkern"]["blocks"]["encoder.layer.0.output"]["adapters"] == ["sst", "mnli", "qqp"]
    twin.save_pretrained(tmp_path)
    reloaded = afkern.from_pretrained(tmp_path)
    batch = token_batch(2, 7, 4)
    torch.testing.assert_close(_outputs(reloaded, batch), _outputs(twin, batch), rtol=0, atol=0)


# ----------------------------------------------------------------------------- safety, failures
def test_bin_weights_never_run_pickled_code(tmp_path):
    model = _patched("BertModel")
    _save_bin(model, tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save({**sd, "evil": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        afkern.from_pretrained(tmp_path)
    assert not marker.exists()


def test_failed_loads_raise_clearly(tmp_path):
    from transformers import BertModel

    plain = tmp_path / "plain"
    BertModel(_config()).save_pretrained(plain)
    with pytest.raises(ValueError, match="no 'afkern' entry"):
        afkern.from_pretrained(plain)
    good = tmp_path / "good"
    _patched("BertModel").save_pretrained(good)
    with pytest.raises(FileNotFoundError, match="config.json"):
        afkern.from_pretrained(tmp_path / "nowhere")
    # the record and the weights disagree: a block records an adapter its weights do not have
    bad = tmp_path / "bad"
    os.makedirs(bad)
    cfg = json.load(open(good / "config.json"))
    cfg["afkern"]["blocks"]["encoder.layer.0.output"]["adapters"].append("extra")
    json.dump(cfg, open(bad / "config.json", "w"))
    os.link(good / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"down_bias is \(3, 8\) but the rebuilt model's is \(4, 8\)"):
        afkern.from_pretrained(bad)
    # a truncated weights file
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:100])
    json.dump(json.load(open(good / "config.json")), open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="not a valid safetensors"):
        afkern.from_pretrained(bad)
    cfg["afkern"]["format"] = 99
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="format 99"):
        afkern.from_pretrained(bad)
    cfg = json.load(open(good / "config.json"))
    cfg["architectures"] = ["os.system"]
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="not a transformers model class"):
        afkern.from_pretrained(bad)


# ----------------------------------------------------------------------------- add_adapters
def test_add_adapters_keeps_outputs_and_places_new_ones_alike():
    model = _patched("BertModel", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch = token_batch(3, 9, 5, seed=4)
    temps = [f.temperature for f in _fusions(model)]
    before = _outputs(model, batch)
    for f, t in zip(_fusions(model), temps):  # the forward annealed them; compare at the same ones
        f.temperature = t
    old = {n: (b.bottleneck, b.adapter_names, b.down_weight.detach().clone()) for n, b in afkern.fused_blocks(model)}
    afkern.add_adapters(model, ["new1", "new2"], afkern.AdapterConfig.houlsby(reduction_factor=5, init_weights_seed=7))
    assert_same("outputs", _outputs(model, batch), before)
    for n, b in afkern.fused_blocks(model):
        r, names, down = old[n]
        assert b.bottleneck == r and b.adapter_names == names + ["new1", "new2"]
        assert_same("kept down weights", b.down_weight[:len(names)], down)
        # AdapterHub's init with a fixed seed: every new adapter starts from the same weights,
        # those of a freshly patched adapter with that seed; zero biases
        fresh = afkern.FusedAdapterBlock(40, ["x"], adapter_config=afkern.AdapterConfig.houlsby(
            reduction_factor=5, init_weights_seed=7), in_features=b.in_features)
        for k in (-2, -1):
            assert_same("a new adapter's down weight", b.down_weight[k], fresh.down_weight[0])
            assert_same("a new adapter's up weight", b.up_weight[k], fresh.up_weight[0])
            assert not b.down_bias[k].any() and not b.up_bias[k].any()
    # a fusion over old and new adapters can then be added and trained
    afkern.add_fusion(model, "grown", ["sst", "new1", "new2"])
    afkern.set_active_fusion(model, "grown")
    model.train()
    out = model(**batch).last_hidden_state
    out.pow(2).mean().backward()
    assert all(b.fusions["grown"].query.weight.grad is not None for _, b in afkern.fused_blocks(model))


def test_add_adapters_refuses_other_placement_or_width_and_taken_names():
    model = _patched("BertModel")
    before = {n: b for n, b in afkern.fused_blocks(model)}
    with pytest.raises(ValueError, match="reduction_factor"):
        afkern.add_adapters(model, ["x"], afkern.AdapterConfig.houlsby(reduction_factor=4))
    with pytest.raises(ValueError, match="mh_adapter"):
        afkern.add_adapters(model, ["x"], afkern.AdapterConfig.pfeiffer(reduction_factor=5, non_linearity="swish"))
    with pytest.raises(ValueError, match="exist already"):
        afkern.add_adapters(model, ["x", "sst"])
    assert {n: b for n, b in afkern.fused_blocks(model)} == before  # nothing changed


def test_add_adapters_then_save_and_reload(tmp_path):
    model = _patched("BertModel")
    afkern.add_adapters(model, ["later"])
    afkern.set_active_adapter(model, "later")
    model.save_pretrained(tmp_path)
    reloaded = afkern.from_pretrained(tmp_path)
    batch = token_batch(2, 7, 4)
    torch.testing.assert_close(_outputs(reloaded, batch), _outputs(model, batch), rtol=0, atol=0)


# ----------------------------------------------------------------------------- from_adapterhub
def test_from_adapterhub_single_adapter_and_refused_compositions():
    adapters = pytest.importorskip("adapters")
    from adapters.composition import Parallel, Stack
    from transformers import BertModel

    torch.manual_seed(0)
    hub = BertModel(_config(hidden_dropout_prob=0.0))
    adapters.init(hub)
    for n in ("a", "b"):
        hub.add_adapter(n, config="seq_bn")
    perturb_(hub, 0.2)
    hub.set_active_adapters("b")
    hub.eval()
    fused = afkern.from_adapterhub(hub)
    blocks = [b for _, b in afkern.fused_blocks(fused)]
    assert blocks and all(b.adapter_names == ["b"] and b.active_adapter == "b" and not b.fusions for b in blocks)
    batch = token_batch(2, 7, 4)
    with torch.no_grad():
        judge("from_adapterhub, one adapter", fused(**batch).last_hidden_state, hub(**batch).last_hidden_state,
              f64_truth(hub, batch))
    for setup, what in ((Stack("a", "b"), "Stack"), (Parallel("a", "b"), "Parallel")):
        hub.set_active_adapters(setup)
        with pytest.raises(ValueError, match=rf"{what}\(\.\.\.\) .*not supported"):
            afkern.from_adapterhub(hub)


# ----------------------------------------------------------------------------- the Trainer workflow
def _trainer_doc_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"<!-- test: trainer -->\n```python\n(.*?)```", text, flags=re.S)


def test_trainer_workflow_in_the_readme_runs(tmp_path, monkeypatch):
    """The README's section on HF's Trainer runs as written (its blocks marked ``test: trainer``, in
    order, in one namespace): patch, train with Trainer (gradient checkpointing on), save_model,
    afkern.from_pretrained, same logits."""
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    blocks = _trainer_doc_blocks()
    assert blocks
    ns = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, code in enumerate(blocks):
            exec(compile(code, f"README.md Trainer example {i}", "exec"), ns)
    assert ns["trainer"].state.global_step > 0
    torch.testing.assert_close(ns["reloaded_logits"], ns["logits"], rtol=0, atol=0)


def test_hooked_family_roundtrip(tmp_path):
    """A family whose blocks sit at hooked sites (GPT-2: ``h.<i>.afkern_output``), pruned."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=40, n_layer=2, n_head=4, vocab_size=97, n_positions=64))
    afkern.patch_model(model, ["a", "b", "c"], fusion_config=afkern.FusionConfig(temperature=True))
    perturb_(model)
    afkern.drop_adapters(model, ["b"])
    model.eval().save_pretrained(tmp_path)
    reloaded = afkern.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert [b.adapter_names for _, b in afkern.fused_blocks(reloaded)] == [["a", "c"], ["a", "c"]]


def test_model_built_without_pooler_reloads(tmp_path):
    """A BertModel built with add_pooling_layer=False (as RoBERTa-style heads build theirs)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72, vocab_size=97)
    m = BertModel(cfg, add_pooling_layer=False).eval()
    afkern.patch_model(m, ["a", "b"])
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = m(ids).last_hidden_state
    m.save_pretrained(tmp_path)
    back = afkern.from_pretrained(tmp_path)
    assert back.pooler is None
    with torch.no_grad():
        assert torch.equal(back(ids).last_hidden_state, y)


def _full_setup(model):
    """Everything a patched model's forward depends on besides its weights, read from the public
    attributes of its blocks (not from the record that from_pretrained itself writes)."""
    out = {}
    for name, b in afkern.fused_blocks(model):
        out[name] = dict(
            adapters=list(b.adapter_names), active_fusion=b.active_fusion, active_adapter=b.active_adapter,
            backend=b.backend, dtype=str(b.down_weight.dtype), training=b.training,
            adapter_config=b.adapter_config.to_dict(),
            fusions={k: dict(adapters=list(f.adapter_names), config=f.config.to_dict(), score_dropout=f.score_dropout,
                             temperature=f.temperature) for k, f in b.fusions.items()})
    return out


@pytest.mark.parametrize("active", ["first fusion", "second fusion", "adapter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_pretrained_restores_the_full_setup(tmp_path, active, dtype):
    """The reloaded model's whole setup equals the saved one's: the active setup of each kind (the
    first of two fusions, the last added, or one adapter), a score dropout set apart from both
    the fusion config's and the model's rate, the annealed temperature, a per-block backend, the
    dtype; and a seeded training step computes the same (dropout masks included)."""
    model = _patched("BertModel").to(dtype)
    blocks = dict(afkern.fused_blocks(model))
    for b in blocks.values():
        b.fusions["pair"].score_dropout = 0.35  # neither the config's 0.2 nor the model's 0.1
    afkern.set_backend(blocks["encoder.layer.0.output"], "reference")
    if active == "first fusion":
        for b in blocks.values():
            b.set_active_fusion(next(iter(b.fusions)))
    elif active == "second fusion":
        afkern.set_active_fusion(model, "pair")
    else:
        afkern.set_active_adapter(model, "qqp")
    want = _full_setup(model)
    assert {s["active_fusion"] for s in want.values()} != {None} or active == "adapter"
    model.save_pretrained(tmp_path)
    reloaded = afkern.from_pretrained(tmp_path, backend=None)
    assert _full_setup(reloaded) == want
    batch = token_batch(3, 9, 5, seed=4)
    model.train()
    reloaded.train()
    torch.manual_seed(11)
    y1 = model(**batch).last_hidden_state
    torch.manual_seed(11)
    y2 = reloaded(**batch).last_hidden_state
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)  # the same computation, bit for bit
