"""AdapterHub directories: load_adapterhub / save_adapterhub, both ways against `adapters`, and safety.

Tests that need the `adapters` package call pytest.importorskip("adapters") (it does not install
on transformers 5); the rest run in both environments (scripts/test_tf5.sh).
"""

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import afkern
from conftest import perturb_, token_batch
from parity import judge

NAMES = ["a", "b", "c"]


def _config(layers=2, hidden=40):
    from transformers import BertConfig

    return BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=72,
                      vocab_size=97, max_position_embeddings=64, num_labels=3)


def _cls(name):
    import transformers

    return getattr(transformers, name)


def _inputs(seed=0):
    return token_batch(2, 9, 6, seed)


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1], getattr(out, "logits", None)


def _base_state(model, plain_cls):
    """The transformers (non-adapter) weights of ``model`` for a fresh ``plain_cls`` model."""
    fresh = plain_cls(model.config)
    keys = set(fresh.state_dict())
    return {k: v for k, v in model.state_dict().items() if k in keys}


def _fresh(cls_name, config, state=None, dtype=torch.float64):
    torch.manual_seed(123)
    m = _cls(cls_name)(config).eval().to(dtype)
    if state is not None:
        missing, unexpected = m.load_state_dict(state, strict=False)
        assert not unexpected
        assert all("classifier" in k or "pooler" in k for k in missing), missing
    return m


def _adapters_model(cls_name, adapter_config, fusion_config, dtype=torch.float64, layers=2, seed=0):
    adapters = pytest.importorskip("adapters")
    from adapters.composition import Fuse

    torch.manual_seed(seed)
    m = _cls(cls_name)(_config(layers)).eval()
    adapters.init(m)
    for n in NAMES:
        m.add_adapter(n, config=adapter_config)
    m.add_adapter_fusion(Fuse(*NAMES), fusion_config)
    m.set_active_adapters(Fuse(*NAMES))
    perturb_(m, 0.3, seed=seed)  # AdapterHub zero-inits biases and near-identity value: make it non-trivial
    return m.to(dtype).eval()


def _afkern_model(cls_name, adapter_config, fusion_config, dtype=torch.float64, layers=2, hidden=40, seed=0):
    torch.manual_seed(seed)
    m = _cls(cls_name)(_config(layers, hidden)).eval().to(dtype)
    afkern.patch_bert(m, NAMES, adapter_config, fusion_config)
    return perturb_(m, 0.3, seed=seed)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
            [(n, type(m)) for n, m in model.named_modules()])


def _assert_untouched(model, snap):
    state, types = _snapshot(model)
    assert types == snap[1]
    assert state.keys() == snap[0].keys()
    for k in state:
        assert torch.equal(state[k], snap[0][k]), k


TOL64 = dict(atol=1e-10, rtol=1e-9)


# ------------------------------------------------------------------------- adapters -> afkern
@pytest.mark.parametrize("adapter_config", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("fusion_config", ["dynamic", "static"])
@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_adapters_saved_afkern_loads(tmp_path, adapter_config, fusion_config, safetensors):
    ah = _adapters_model("BertForSequenceClassification", adapter_config, fusion_config)
    dirs = []
    for n in NAMES:
        ah.save_adapter(str(tmp_path / n), n, use_safetensors=safetensors)
        dirs.append(str(tmp_path / n))
    ah.save_adapter_fusion(str(tmp_path / "fusion"), ",".join(NAMES), use_safetensors=safetensors)
    want = "adapter.safetensors" if safetensors else "pytorch_adapter.bin"
    assert os.path.exists(tmp_path / "a" / want)
    inputs = _inputs()
    want_h, want_logits = _outputs(ah, inputs)

    plain = _fresh("BertForSequenceClassification", ah.config, _base_state(ah, _cls("BertForSequenceClassification")))
    afkern.load_adapterhub(plain, dirs, str(tmp_path / "fusion"), backend="torch")
    n_blocks = len(list(afkern.fused_blocks(plain)))
    assert n_blocks == (4 if adapter_config == "double_seq_bn" else 2)
    got_h, got_logits = _outputs(plain, inputs)
    torch.testing.assert_close(got_h, want_h, **TOL64)
    torch.testing.assert_close(got_logits, want_logits, **TOL64)
    assert (want_h - _outputs(_fresh("BertForSequenceClassification", ah.config, _base_state(
        ah, _cls("BertForSequenceClassification"))), inputs)[0]).abs().max() > 1e-3  # adapters matter


def test_adapters_to_afkern_float32(tmp_path):
    """The realistic case: float32 checkpoints; agreement to float32 rounding."""
    ah = _adapters_model("BertForSequenceClassification", "seq_bn", "dynamic", dtype=torch.float32)
    for n in NAMES:
        ah.save_adapter(str(tmp_path / n), n)
    ah.save_adapter_fusion(str(tmp_path / "f"), ",".join(NAMES))
    plain = _fresh("BertForSequenceClassification", ah.config, _base_state(ah, _cls("BertForSequenceClassification")),
                   dtype=torch.float32)
    afkern.load_adapterhub(plain, {n: str(tmp_path / n) for n in NAMES}, str(tmp_path / "f"))
    inputs = _inputs()
    truth = copy.deepcopy(ah).double()  # the same weights in float64
    judge("last hidden state", _outputs(plain, inputs)[0], _outputs(ah, inputs)[0], _outputs(truth, inputs)[0])


@pytest.mark.parametrize("kind", ["task", "lang"])
def test_legacy_adapter_transformers_keys_load(tmp_path, kind):
    """Directories of adapter-transformers 2.x/3.x name the adapters' modules
    ``attention_text_<kind>_adapters`` (attention site) and ``layer_text_<kind>_adapters`` (output
    site); AdapterHub renames both to ``adapters`` on load, and so does load_adapterhub."""
    from safetensors.torch import load_file, save_file

    ah = _adapters_model("BertModel", "double_seq_bn", "dynamic")
    dirs = []
    for n in NAMES:
        d = tmp_path / n
        ah.save_adapter(str(d), n, use_safetensors=True)
        sd = load_file(str(d / "adapter.safetensors"))
        legacy = {k.replace(".attention.output.adapters.", f".attention.output.attention_text_{kind}_adapters.")
                   .replace(".output.adapters.", f".output.layer_text_{kind}_adapters."): v for k, v in sd.items()}
        assert sum(f"attention_text_{kind}" in k for k in legacy) and sum(f"layer_text_{kind}" in k for k in legacy)
        assert not any(".adapters." in k for k in legacy)
        save_file(legacy, str(d / "adapter.safetensors"))
        dirs.append(str(d))
    ah.save_adapter_fusion(str(tmp_path / "fusion"), ",".join(NAMES))
    plain = _fresh("BertModel", ah.config, _base_state(ah, _cls("BertModel")))
    afkern.load_adapterhub(plain, dirs, str(tmp_path / "fusion"))
    assert len(list(afkern.fused_blocks(plain))) == 4
    inputs = _inputs()
    torch.testing.assert_close(_outputs(plain, inputs)[0], _outputs(ah, inputs)[0], **TOL64)


@pytest.mark.parametrize("src,dst", [("BertModel", "BertForSequenceClassification"),
                                     ("BertForSequenceClassification", "BertModel")])
def test_base_prefix_either_way(tmp_path, src, dst):
    """Keys with ("bert.encoder...") or without ("encoder...") the base prefix load into either."""
    ah = _adapters_model(src, "seq_bn", "dynamic")
    for n in NAMES:
        ah.save_adapter(str(tmp_path / n), n, use_safetensors=True)
    ah.save_adapter_fusion(str(tmp_path / "f"), ",".join(NAMES), use_safetensors=True)
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "a" / "adapter.safetensors")))
    assert all(k.startswith("bert.") == (src != "BertModel") for k in keys)
    base_ah = ah.base_model
    plain = _fresh(dst, ah.config)
    plain.base_model.load_state_dict(_base_state(base_ah, _cls("BertModel")), strict=True)
    afkern.load_adapterhub(plain, [str(tmp_path / n) for n in NAMES], str(tmp_path / "f"))
    inputs = _inputs()
    with torch.no_grad():
        want = base_ah(**inputs).last_hidden_state
        got = plain.base_model(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, **TOL64)


def test_from_adapterhub_matches(tmp_path):
    ah = _adapters_model("BertForSequenceClassification", "double_seq_bn", "dynamic")
    conv = afkern.from_adapterhub(ah)
    assert type(conv) is _cls("BertForSequenceClassification")  # the head is kept (issue 20)
    inputs = _inputs()
    (want, want_logits), (got, got_logits) = _outputs(ah, inputs), _outputs(conv, inputs)
    torch.testing.assert_close(got, want, **TOL64)
    torch.testing.assert_close(got_logits, want_logits, **TOL64)
    assert len(list(afkern.fused_blocks(conv))) == 4


# ------------------------------------------------------------------------- afkern -> adapters
@pytest.mark.parametrize("adapter_config", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("fusion_config", ["dynamic", "static"])
@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_afkern_saved_adapters_loads(tmp_path, adapter_config, fusion_config, safetensors):
    adapters = pytest.importorskip("adapters")
    from adapters.composition import Fuse

    m = _afkern_model("BertForSequenceClassification", adapter_config, fusion_config)
    written = afkern.save_adapterhub(m, str(tmp_path), safe_serialization=safetensors)
    assert set(written) == set(NAMES) | {"a,b,c"}
    ext = "adapter.safetensors" if safetensors else "pytorch_adapter.bin"
    assert os.path.exists(os.path.join(written["a"], ext))
    ah = _fresh("BertForSequenceClassification", m.config, _base_state(m, _cls("BertForSequenceClassification")))
    adapters.init(ah)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # load_adapter builds its modules in the default dtype
    try:
        for n in NAMES:
            assert ah.load_adapter(written[n], use_safetensors=safetensors) == n
        ah.load_adapter_fusion(written["a,b,c"], use_safetensors=safetensors)
    finally:
        torch.set_default_dtype(prev)
    ah.set_active_adapters(Fuse(*NAMES))
    ah.eval()
    inputs = _inputs()
    got_h, got_logits = _outputs(ah, inputs)
    want_h, want_logits = _outputs(m, inputs)
    torch.testing.assert_close(got_h, want_h, **TOL64)
    torch.testing.assert_close(got_logits, want_logits, **TOL64)


# ------------------------------------------------------------------------- afkern -> afkern
@pytest.mark.parametrize("adapter_config", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("fusion_config", ["dynamic", "static"])
@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_afkern_round_trip(tmp_path, adapter_config, fusion_config, safetensors):
    m = _afkern_model("BertForSequenceClassification", adapter_config, fusion_config)
    written = afkern.save_adapterhub(m, str(tmp_path), safe_serialization=safetensors)
    meta = json.loads(open(os.path.join(written["a,b,c"], "adapter_fusion_config.json")).read())
    assert meta["adapter_names"] == NAMES and meta["config"]["value"] == (fusion_config == "dynamic")
    assert not [f for f in os.listdir(written["a"]) if f.startswith(".tmp")]  # atomic writes leave nothing
    fresh = _fresh("BertForSequenceClassification", m.config, _base_state(m, _cls("BertForSequenceClassification")))
    afkern.load_adapterhub(fresh, [written[n] for n in NAMES], written["a,b,c"])
    blocks_a, blocks_b = dict(afkern.fused_blocks(m)), dict(afkern.fused_blocks(fresh))
    assert blocks_a.keys() == blocks_b.keys()
    for k in blocks_a:
        sa, sb = blocks_a[k].state_dict(), blocks_b[k].state_dict()
        for p in sa:
            if isinstance(sa[p], torch.Tensor):
                torch.testing.assert_close(sb[p], sa[p], atol=1e-15, rtol=0, msg=f"{k}.{p}")
    inputs = _inputs()
    for got, want in zip(_outputs(fresh, inputs), _outputs(m, inputs)):
        torch.testing.assert_close(got, want, **TOL64)


def test_load_without_fusion_is_single_adapter(tmp_path):
    m = _afkern_model("BertModel", "pfeiffer", "dynamic")
    written = afkern.save_adapterhub(m, str(tmp_path))
    fresh = _fresh("BertModel", m.config, _base_state(m, _cls("BertModel")))
    afkern.load_adapterhub(fresh, [written["b"], written["c"]])
    for _, b in afkern.fused_blocks(fresh):
        assert b.fusion_config is None and b.adapter_names == ["b", "c"] and b.active_adapter == "b"


def test_load_adapterhub_without_adapters_package(tmp_path):
    """load_adapterhub / save_adapterhub never import `adapters`: run them with it blocked."""
    m = _afkern_model("BertForSequenceClassification", "houlsby", "dynamic")
    written = afkern.save_adapterhub(m, str(tmp_path / "ckpt"))
    inputs = _inputs()
    torch.save({"inputs": inputs, "state": _base_state(m, _cls("BertForSequenceClassification")),
                "want": _outputs(m, inputs)[1]}, tmp_path / "case.pt")
    m.config.to_json_file(str(tmp_path / "config.json"))
    json.dump(written, open(tmp_path / "written.json", "w"))
    script = textwrap.dedent(f"""
        import sys, json
        sys.modules["adapters"] = None  # any `import adapters` now raises ImportError
        import torch, afkern, transformers
        case = torch.load({str(tmp_path / "case.pt")!r}, weights_only=True)
        cfg = transformers.BertConfig.from_json_file({str(tmp_path / "config.json")!r})
        model = transformers.BertForSequenceClassification(cfg).eval().double()
        model.load_state_dict(case["state"], strict=False)
        d = json.load(open({str(tmp_path / "written.json")!r}))
        afkern.load_adapterhub(model, [d[n] for n in "abc"], d["a,b,c"])
        with torch.no_grad():
            got = model(**case["inputs"]).logits
        torch.testing.assert_close(got, case["want"], atol=1e-10, rtol=1e-9)
        afkern.save_adapterhub(model, {str(tmp_path / "again")!r})
        assert sys.modules["adapters"] is None
        print("OK", len(list(afkern.fused_blocks(model))))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK 4" in r.stdout


# ------------------------------------------------------------------------- safety
class _Evil:
    """Unpickling this creates a file: proof that code would have run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.mark.parametrize("container", ["torch.save", "raw-pickle"])
def test_malicious_pickle_refused(tmp_path, container):
    m = _afkern_model("BertModel", "pfeiffer", "dynamic")
    written = afkern.save_adapterhub(m, str(tmp_path / "ckpt"), safe_serialization=False)
    marker = tmp_path / "pwned"
    # the payload is live: plain pickle would run it
    pickle.loads(pickle.dumps(_Evil(str(tmp_path / "live"))))
    assert (tmp_path / "live").exists()
    bin_path = os.path.join(written["b"], "pytorch_adapter.bin")
    sd = torch.load(bin_path, weights_only=True)
    sd[next(iter(sd))] = _Evil(str(marker))
    if container == "torch.save":
        torch.save(sd, bin_path)
    else:
        with open(bin_path, "wb") as f:
            pickle.dump(sd, f)
    fresh = _fresh("BertModel", m.config, _base_state(m, _cls("BertModel")))
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match="weights_only=True"):
        afkern.load_adapterhub(fresh, [written[n] for n in NAMES], written["a,b,c"])
    assert not marker.exists()
    _assert_untouched(fresh, snap)


def test_garbage_safetensors_refused(tmp_path):
    m = _afkern_model("BertModel", "pfeiffer", "dynamic")
    written = afkern.save_adapterhub(m, str(tmp_path))
    with open(os.path.join(written["c"], "adapter.safetensors"), "wb") as f:
        f.write(os.urandom(64) + b"not a safetensors file")
    fresh = _fresh("BertModel", m.config)
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        afkern.load_adapterhub(fresh, [written[n] for n in NAMES], written["a,b,c"])
    _assert_untouched(fresh, snap)


def _write(tmp_path, **kw):
    m = _afkern_model("BertModel", "pfeiffer", "dynamic", **kw)
    return afkern.save_adapterhub(m, str(tmp_path))


@pytest.mark.parametrize("case", ["hidden-size", "hidden-size-tensors", "more-layers", "fewer-layers",
                                  "fusion-names-missing", "no-weights-file", "wrong-kind-dir"])
def test_bad_checkpoints_clear_errors_model_untouched(tmp_path, case):
    layers, hidden = 2, 40
    if case == "more-layers":
        written = _write(tmp_path, layers=4)  # checkpoint has layers 2, 3 the model lacks
        match = "layer 3 but the model has 2 layers"
    elif case == "fewer-layers":
        written = _write(tmp_path, layers=1)  # the model's layer 1 would be left without adapters
        match = "no weights for layer 1 output"
    elif case.startswith("hidden-size"):
        written = _write(tmp_path, hidden=24)
        if case == "hidden-size":
            match = "hidden size 24, the model has 40"
        else:  # the json claims the right size, the tensors say otherwise
            for n in NAMES + ["a,b,c"]:
                p = os.path.join(written[n], "adapter_fusion_config.json" if "," in n else "adapter_config.json")
                meta = json.load(open(p))
                meta["hidden_size"] = 40
                json.dump(meta, open(p, "w"))
            match = r"must be \(2, 40\)"
    else:
        written = _write(tmp_path)
        match = {"fusion-names-missing": r"names adapters \['c'\] that were not given",
                 "no-weights-file": "has none of", "wrong-kind-dir": "adapter_config.json"}[case]
        if case == "no-weights-file":
            for f in ("adapter.safetensors", "pytorch_adapter.bin"):  # the default save writes both
                os.remove(os.path.join(written["a"], f))
    fresh = _fresh("BertModel", _config(layers, hidden))
    snap = _snapshot(fresh)
    dirs = [written[n] for n in NAMES]
    if case == "fusion-names-missing":
        dirs = dirs[:2]
    if case == "wrong-kind-dir":
        dirs = [written["a,b,c"]]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        afkern.load_adapterhub(fresh, dirs, written["a,b,c"])
    _assert_untouched(fresh, snap)


def test_load_into_patched_model_refused(tmp_path):
    written = _write(tmp_path)
    m = _afkern_model("BertModel", "pfeiffer", "dynamic")
    with pytest.raises(ValueError, match="already has FusedAdapterBlocks"):
        afkern.load_adapterhub(m, [written[n] for n in NAMES], written["a,b,c"])


def test_default_save_is_read_by_adapterhub_default_load(tmp_path):
    """save_adapterhub's default writes both formats, so AdapterHub's plain load_adapter(dir) (which
    looks for the .bin) and load_adapter(dir, use_safetensors=True) both read it; a later save in
    one format removes the other so nobody reads a stale copy."""
    adapters = pytest.importorskip("adapters")
    from adapters import Fuse

    written = _write(tmp_path)
    for n in NAMES:
        assert sorted(os.listdir(written[n])) == ["adapter.safetensors", "adapter_config.json", "pytorch_adapter.bin"]
    hub = _fresh("BertModel", _config(2, 40), dtype=torch.float32)
    adapters.init(hub)
    for n in NAMES:
        hub.load_adapter(written[n])
    hub.load_adapter_fusion(written["a,b,c"])
    hub.set_active_adapters(Fuse(*NAMES))
    ours = afkern.load_adapterhub(_fresh("BertModel", _config(2, 40), dtype=torch.float32), [written[n] for n in NAMES],
                                  written["a,b,c"])
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    truth = copy.deepcopy(hub).double().eval()
    with torch.no_grad():
        judge("last hidden state", ours.eval()(ids).last_hidden_state, hub.eval()(ids).last_hidden_state,
              truth(ids).last_hidden_state)
    afkern.save_adapterhub(ours, str(tmp_path), safe_serialization=True)
    assert not os.path.exists(os.path.join(written["a"], "pytorch_adapter.bin"))
