"""Tests of the family oracle harness itself (tests/families.py), not of afkern.

They check that every priority family builds with AdapterHub's `adapters` 1.3.0, that its fusion
is active and non-degenerate, that float64 and float32 agree to float32 rounding, that
save_adapter / save_adapter_fusion write the key patterns docs/FAMILIES.md lists, and that the
executable site table (HookReference on the *plain* model) reproduces AdapterHub exactly on
transformers 4.57 and, through .venv-tf5 when it exists, on transformers 5.x.
"""

import copy
import os
import subprocess
import sys
import time
from functools import lru_cache

import pytest
import torch

adapters = pytest.importorskip("adapters")

sys.path.insert(0, os.path.dirname(__file__))
import families as F  # noqa: E402
from parity import assert_same  # noqa: E402

CASES = [(name, v) for name, spec in F.FAMILIES.items() for v in F.variants(spec)]
IDS = [f"{n}-{v}" for n, v in CASES]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF5_PY = os.path.join(ROOT, ".venv-tf5", "bin", "python")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


_built = lru_cache(maxsize=None)(F.build)


@lru_cache(maxsize=None)
def _outputs(name, variant):
    spec, _, hub = _built(name, variant)
    return F.adapterhub_outputs(hub, spec, torch.float64), F.adapterhub_outputs(hub, spec, torch.float32)


def test_table_covers_priority_families_and_sites():
    assert set(F.PRIORITY) | {"bert"} == set(F.FAMILIES)
    for name, spec in F.FAMILIES.items():
        # the declarative site table and the executable one name the same AdapterHub modules
        declared = {F.site_key_prefix(s) for s in spec.sites}
        executable = {F.normalise_key(h.ah.format(i=0) + ".x")[:-2] for h in F.hook_sites(name, major=4)}
        assert declared == executable, name
        assert F.hook_sites(name, major=5)  # a 5.x table exists


def test_flag_tables_match_adapters_configs():
    for variant, flags in F.ADAPTER_FLAGS.items():
        cfg = F.adapter_config(variant)
        for k, v in flags.items():
            assert cfg[k] == v, (variant, k)
    for fusion, flags in F.FUSION_FLAGS.items():
        cfg = adapters.AdapterFusionConfig.load(fusion)
        for k, v in flags.items():
            assert cfg[k] == v, (fusion, k)


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_builds_with_active_nondegenerate_fusion(name, variant):
    spec, plain, hub = _built(name, variant)
    assert hub.active_adapters == adapters.Fuse(*F.ADAPTER_NAMES)
    mods = F.fusion_modules(hub)
    expected = sum(len(F._get(hub, s.layers)) for s in F.active_sites(spec, variant))
    assert len(mods) == expected
    assert all(type(m.value).__name__ == "Linear" for m in mods.values())  # dynamic fusion

    records = F.fusion_max_prob(hub, spec)
    calls = 3 if spec.shared_layers else 1  # ALBERT: one shared layer, applied 3 times
    assert len(records) == calls * len(mods)
    assert {n for n, _ in records} == set(mods)
    for n, p in records:
        assert p < F.P_LIMIT, (n, p)
    per_layer = {}
    for n, p in records:
        per_layer.setdefault(n, []).append(p)
    for n, ps in per_layer.items():
        assert sum(ps) / len(ps) > 0.4, (n, ps)  # far from uniform (1/3)

    # nothing but the adapters differs from the plain model (DeBERTa's in_proj.bias: zeroed)
    ps = dict(plain.named_parameters())
    for k, v in hub.named_parameters():
        if k in ps:
            assert torch.equal(v, ps[k]), k
    assert hub._afkern_zeroed == (
        [f"encoder.layer.{i}.attention.self.in_proj.bias" for i in range(2)] if name == "deberta" else [])


@pytest.mark.parametrize("name", ["bert", "llama", "t5", "vit"])
def test_probe_matches_adapterhub_fusion_attentions(name):
    spec, _, hub = _built(name, "double_seq_bn")
    inputs = F.make_inputs(spec)
    with F.FusionProbe(hub) as probe, torch.no_grad():
        out = hub(**inputs, output_adapter_fusion_attentions=True)
    stored = out["adapter_fusion_attentions"][",".join(F.ADAPTER_NAMES)]
    # AdapterHub keys them by layer_idx (decoder after encoder) and location; that is call order
    order = ("mh_adapter", "cross_adapter", "output_adapter")
    flat = [torch.as_tensor(stored[i][loc]) for i in sorted(stored) for loc in order if loc in stored[i]]
    assert len(flat) == len(probe.records)
    for (_, p), q in zip(probe.records, flat):
        assert_same("probe against AdapterHub's stored attentions", p, q.to(p.dtype))


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_float64_and_float32_agree(name, variant):
    spec, _, hub = _built(name, variant)
    o64, o32 = _outputs(name, variant)
    assert o64.hidden.dtype == torch.float64 and o32.hidden.dtype == torch.float32
    assert torch.isfinite(o64.hidden).all()
    # a check of the test cases, not of afkern: the oracle in float32 is within 1e-5 (84 float32
    # ulps) of float64, so the 2x rule's baseline error is rounding, not an ill-conditioned case
    assert F.rel_err(o32.hidden, o64.hidden) < 1e-5
    if o64.encoder_hidden is not None:
        assert F.rel_err(o32.encoder_hidden, o64.encoder_hidden) < 1e-5
    n_emb = 2 if spec.kind == "encoder-decoder" else 1
    assert len(o64.embed_grads) == len(o32.embed_grads) == n_emb
    for g64, g32 in zip(o64.embed_grads, o32.embed_grads):
        assert g64 is not None and g64.abs().sum() > 0
        assert F.rel_err(g32, g64) < 1e-5
    if spec.kind == "vision":
        assert F.rel_err(o32.pixel_grad, o64.pixel_grad) < 1e-5
    # the adapters matter: the plain model computes something else
    plain64 = F.run_with_grads(copy.deepcopy(_built(name, variant)[1]).double(), spec, F.make_inputs(spec))
    assert F.rel_err(plain64.hidden, o64.hidden) > 1e-2


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_save_writes_documented_keys(name, variant, tmp_path):
    spec, _, hub = _built(name, variant)
    saved = F.saved_keys(hub, tmpdir=str(tmp_path))
    ad_dir, fu_dir = saved["dirs"]
    assert os.path.isfile(os.path.join(ad_dir, "adapter_config.json"))
    assert os.path.isfile(os.path.join(fu_dir, "adapter_fusion_config.json"))
    expected = F.expected_key_patterns(spec, variant)
    assert sorted({F.normalise_key(k) for k in saved["adapter"]}) == expected["adapter"]
    assert sorted({F.normalise_key(k) for k in saved["fusion"]}) == expected["fusion"]
    # one entry per layer (per distinct AdapterHub layer for ALBERT)
    n_layers = sum(len(F._get(hub, s.layers)) for s in F.active_sites(spec, variant))
    assert len(saved["fusion"]) == n_layers * len(F.FUSION_LEAVES["dynamic"])


@pytest.mark.parametrize("name", ["albert", "t5", "qwen2"])
def test_saved_directories_reload_into_adapterhub(name, tmp_path):
    spec, plain, hub = _built(name, "double_seq_bn")
    for n in F.ADAPTER_NAMES:
        hub.save_adapter(str(tmp_path / n), n)
    hub.save_adapter_fusion(str(tmp_path / "fusion"), adapters.Fuse(*F.ADAPTER_NAMES))
    fresh = copy.deepcopy(plain).float().eval()
    adapters.init(fresh)
    F.zero_added_base_params_(fresh, plain)
    for n in F.ADAPTER_NAMES:
        fresh.load_adapter(str(tmp_path / n))
    fresh.load_adapter_fusion(str(tmp_path / "fusion"), set_active=True)
    fresh.eval()
    inputs = F.make_inputs(spec)
    with torch.no_grad():
        a = hub(**inputs).last_hidden_state
        b = fresh(**inputs).last_hidden_state
    torch.testing.assert_close(b, a, atol=0, rtol=0)


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_hook_reference_on_plain_model_equals_adapterhub(name, variant):
    """The executable site table (hooks on the PLAIN model) reproduces AdapterHub, float64."""
    spec, plain, hub = _built(name, variant)
    o64, _ = _outputs(name, variant)
    model = copy.deepcopy(plain).double()
    ref = F.HookReference(model, spec, hub.state_dict(), variant)
    out = F.run_with_grads(model, spec, F.make_inputs(spec))
    ref.remove()
    assert F.rel_err(out.hidden, o64.hidden) < 1e-12
    for a, b in zip(out.embed_grads, o64.embed_grads):
        assert F.rel_err(a, b) < 1e-12
    # hooks removed: the plain model again
    again = F.run_with_grads(model, spec, F.make_inputs(spec))
    assert F.rel_err(again.hidden, o64.hidden) > 1e-2


@pytest.mark.parametrize("name", ["distilbert", "gpt2", "t5"])
def test_hook_reference_static_fusion(name):
    spec = F.FAMILIES[name]
    plain = F.make_plain(spec)
    hub = F.make_adapterhub(spec, "double_seq_bn", plain=plain, fusion="static")
    ref64 = F.adapterhub_outputs(hub, spec, torch.float64)
    model = copy.deepcopy(plain).double()
    ref = F.HookReference(model, spec, hub.state_dict(), "double_seq_bn", fusion="static")
    out = F.run_with_grads(model, spec, F.make_inputs(spec))
    ref.remove()
    assert F.rel_err(out.hidden, ref64.hidden) < 1e-12


def test_adapterhub_crash_cases_are_what_the_docs_say():
    spec = F.FAMILIES["llama"]
    plain = F.make_plain(spec)
    m = copy.deepcopy(plain)
    adapters.init(m)
    m.add_adapter("a", config=adapters.SeqBnConfig(residual_before_ln="post_add"))
    m.set_active_adapters("a")
    with pytest.raises(UnboundLocalError):
        m(**F.make_inputs(spec))
    flags = dict(F.ADAPTER_FLAGS["seq_bn"], residual_before_ln="post_add")
    h = torch.randn(2, 3, F.HIDDEN)
    with pytest.raises(ValueError, match="post_add"):
        F.reference_site(h, h, None, {}, flags, F.FUSION_FLAGS["dynamic"])

    q = copy.deepcopy(F.make_plain(F.FAMILIES["qwen2"]))
    adapters.init(q)
    with pytest.raises(ValueError, match="original_ln_after"):
        q.add_adapter("a", config=adapters.SeqBnConfig(original_ln_after=False))


@pytest.mark.skipif(not os.path.exists(TF5_PY), reason="no .venv-tf5 (scripts/test_tf5.sh creates it)")
def test_hook_reference_on_transformers5_equals_adapterhub(tmp_path):
    """Same weights, same inputs: plain + site hooks on transformers 5.x == AdapterHub on 4.57."""
    cases, expect = [], []
    for name, variant in CASES:
        spec, plain, hub = _built(name, variant)
        cases.append(F.export_case(spec, variant, plain, hub))
        plain64 = F.run_with_grads(copy.deepcopy(plain).double(), spec, F.make_inputs(spec))
        expect.append((_outputs(name, variant)[0], plain64))
    torch.save(cases, tmp_path / "in.pt")
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.time()
    proc = subprocess.run([TF5_PY, os.path.join(ROOT, "tests", "families.py"), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.time() - t0 < 120
    outs = torch.load(tmp_path / "out.pt", weights_only=False)
    for (name, variant), (hub64, plain64), out in zip(CASES, expect, outs):
        assert out["transformers"].startswith("5.")
        # T5 on 4.57 takes its attention softmax in float32 (scores.float()), 5.x does not
        tol = 1e-6 if name == "t5" else 1e-12
        assert F.rel_err(out["plain"]["hidden"], plain64.hidden) < tol, (name, "plain")
        assert F.rel_err(out["reference"]["hidden"], hub64.hidden) < tol, (name, variant)
        for a, b in zip(out["reference"]["embed_grads"], hub64.embed_grads):
            assert F.rel_err(a, b) < 1000 * tol, (name, variant, "grad")
