"""transformers 5.x: AdapterHub directories saved on 4.57 load into plain 5.x models of every
family and give AdapterHub's 4.57 outputs (scripts/test_tf5.sh runs this in .venv-tf5).

AdapterHub's `adapters` does not install on transformers 5 (its issue #834), so the references
are made by tests/family_fixtures.py in the 4.57 environment (.venv, or AFKERN_TF4_PYTHON),
through a subprocess: the plain models' weights, AdapterHub's saved directories and its float64
and float32 outputs. Here: ``afkern.load_adapterhub`` on the plain 5.x model (ViT's weights
renamed to 5.x names; AdapterHub's keys keep their 4.57 names), then

* float64: last hidden state and input gradients equal AdapterHub's to 1e-9 relative (T5: 1e-6,
  because transformers 4.57 takes T5's attention softmax in float32 and 5.x does not; the plain
  model moves by ~1e-7 between the versions, docs/FAMILIES.md pitfall 4);
* float32: error against AdapterHub's float64 at most twice AdapterHub's own float32 error;
* ``save_adapterhub`` on 5.x writes the keys AdapterHub wrote on 4.57, with the same values.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

import afkern

sys.path.insert(0, os.path.dirname(__file__))
import families as F  # noqa: E402
import family_fixtures  # noqa: E402

if F.TF_MAJOR < 5:
    pytest.skip("transformers 5 only (on 4.57, tests/test_families_adapterhub.py compares with adapters itself)",
                allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF4_PY = os.environ.get("AFKERN_TF4_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
CASES = family_fixtures.cases()
NAMES = list(F.ADAPTER_NAMES)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    if not os.path.exists(TF4_PY):
        pytest.skip(f"no transformers-4.57 environment with adapters at {TF4_PY} (make venv creates .venv)")
    out = tmp_path_factory.mktemp("adapterhub457")
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([TF4_PY, os.path.join(ROOT, "tests", "family_fixtures.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {(c["family"], c["variant"]): c for c in torch.load(out / "cases.pt", weights_only=False)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def _plain(case):
    spec = F.FAMILIES[case["family"]]
    model = F.make_plain(spec)
    missing, unexpected = model.load_state_dict(F.convert_plain_state(spec.name, case["plain_state"]), strict=False)
    assert not unexpected and all(k.endswith(("position_ids", "token_type_ids")) for k in missing), (missing, unexpected)
    return spec, model


def _load(model, case):
    folder = case["folder"]
    return afkern.load_adapterhub(model, [os.path.join(folder, n) for n in NAMES], os.path.join(folder, "fusion"),
                                  backend="torch")


def _grads(d):
    return list(d["embed_grads"]) + ([d["pixel_grad"]] if d["pixel_grad"] is not None else [])


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_adapterhub_directories_give_457_outputs(fixtures, name, variant, tmp_path):
    case = fixtures[(name, variant)]
    spec, plain = _plain(case)
    hub64, hub32 = case["hub64"], case["hub32"]
    tol = 1e-6 if name == "t5" else 1e-9
    m64 = _load(copy.deepcopy(plain).double(), case)
    out = F.run_with_grads(m64, spec, case["inputs"])
    assert F.rel_err(out.hidden, hub64["hidden"]) < tol
    if hub64["encoder_hidden"] is not None:
        assert F.rel_err(out.encoder_hidden, hub64["encoder_hidden"]) < tol
    for g, w in zip(_grads(out.__dict__), _grads(hub64)):
        assert F.rel_err(g, w) < 100 * tol, "grad"
    m32 = _load(copy.deepcopy(plain), case)
    out32 = F.run_with_grads(m32, spec, case["inputs"])
    assert F.rel_err(out32.hidden, hub64["hidden"]) <= 2 * F.rel_err(hub32["hidden"], hub64["hidden"]) + tol
    for g, g32, w in zip(_grads(out32.__dict__), _grads(hub32), _grads(hub64)):
        assert F.rel_err(g, w) <= 2 * F.rel_err(g32, w) + 100 * tol, "grad"
    # what 5.x writes is what AdapterHub wrote on 4.57: the same keys (4.57 names), the same values
    written = afkern.save_adapterhub(m32, str(tmp_path), safe_serialization=False)
    for ours, theirs, fname in [(written[n], os.path.join(case["folder"], n), "pytorch_adapter.bin") for n in NAMES] + [
            (written["a,b,c"], os.path.join(case["folder"], "fusion"), "pytorch_model_adapter_fusion.bin")]:
        a = torch.load(os.path.join(ours, fname), weights_only=True)
        b = torch.load(os.path.join(theirs, fname), weights_only=True)
        # afkern writes every key under the base_model_prefix (AdapterHub's head classes need it);
        # AdapterHub's base model wrote them bare: the same keys once the prefix is taken off
        bp = m32.base_model_prefix + "."
        assert all(k.startswith(bp) for k in a), sorted(a)[:3]
        a = {k[len(bp):]: v for k, v in a.items()}
        assert sorted(a) == sorted(b)
        for k in b:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
