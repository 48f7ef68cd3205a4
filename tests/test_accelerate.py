"""``afkern.accelerate(model)`` against AdapterHub's `adapters` 1.3.0 itself (the oracle).

Each test runs the same AdapterHub model (tests/families.py: tiny random models, three adapters,
a Fuse, non-degenerate weights) with AdapterHub's code and accelerated. Judges: float64 outputs and
every gradient (input embeddings and every parameter) to 1e-9 relative; float32 and bfloat16 error
against the float64 truth at most twice AdapterHub's own error in that dtype plus a tiny floor
(:func:`assert_2x`), training path and folded inference.
"""

import copy
import os
import sys
import threading
import warnings
from functools import lru_cache

import pytest
import torch

adapters = pytest.importorskip("adapters")
from adapters import Fuse, Parallel, Stack  # noqa: E402

import afkern  # noqa: E402
from afkern.backends import torch_ops  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import families as F  # noqa: E402
import parity  # noqa: E402

CASES = [(name, v) for name, spec in F.FAMILIES.items() for v in F.variants(spec)]
IDS = [f"{n}-{v}" for n, v in CASES]
NAMES = list(F.ADAPTER_NAMES)
pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return F.rel_err(a, b)


def assert_2x(got, truth, own, dtype, what=""):
    """The suite's one rule (tests/parity.py): ``got``'s error against the float64 ``truth`` at
    most twice ``own``'s (AdapterHub's in the same dtype) plus parity's floor for ``dtype``."""
    parity.assert_2x(what, got, own, truth, dtype)


@lru_cache(maxsize=None)
def _hub(name, variant, fusion="dynamic"):
    spec = F.FAMILIES[name]
    plain = F.make_plain(spec)
    return spec, F.make_adapterhub(spec, variant, plain=plain, fusion=fusion)


def _param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, spec, inputs, seed=None):
    """Outputs, input-embedding grads and every parameter grad of one forward + backward."""
    if seed is not None:
        torch.manual_seed(seed)
    out = F.run_with_grads(model, spec, inputs)
    return out, _param_grads(model)


class Calls:
    """Counts the calls of the torch backend's layer: proves the accelerated path ran."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = torch_ops.layer

        def layer(*a, **k):
            self.n += 1
            return orig(*a, **k)

        monkeypatch.setattr(torch_ops, "layer", layer)


def _compare64(hub, acc, spec, inputs, seed=None, what=""):
    (o, go), (a, ga) = _run(hub, spec, inputs, seed), _run(acc, spec, inputs, seed)
    assert rel(a.hidden, o.hidden) < 1e-9, what
    for x, y in zip(a.embed_grads + [a.pixel_grad], o.embed_grads + [o.pixel_grad]):
        if y is not None:
            assert rel(x, y) < 1e-9, (what, "input grad")
    zero = _zero_grads(go)
    # a fusion's key bias adds q . bk to every adapter's score: it cancels in the softmax and afkern's
    # layer drops it (no gradient); under score dropout it does not cancel and both give it one
    assert all(k.endswith(".key.bias") and k in zero for k in go.keys() - ga.keys()), what
    assert ga and ga.keys() <= go.keys(), what
    for k in ga:
        if k in zero:  # a true gradient of 0 (softmax-invariant biases): both are rounding noise
            assert ga[k].abs().max().item() <= 1e-12 * _scale(go), (what, k)
        else:
            assert rel(ga[k], go[k]) < 1e-9, (what, k)
    return o, ga


def _scale(grads):
    return max(g.abs().max().item() for g in grads.values())


def _zero_grads(grads, dtype=torch.float64):
    """Names of the gradients that are 0 up to rounding (key biases of softmax attentions)."""
    tol = (1e-12 if dtype == torch.float64 else 1e-5) * _scale(grads)
    return {k for k, g in grads.items() if g.abs().max().item() <= tol}


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_every_family_matches_adapterhub(name, variant, monkeypatch):
    """Outputs, input and every parameter gradient: float64 to 1e-9, float32 by the 2x rule (training
    path and folded inference), for every family and placement (Pfeiffer, Houlsby, cross)."""
    spec, hub = _hub(name, variant)
    inputs = F.make_inputs(spec)
    calls = Calls(monkeypatch)
    hub64 = copy.deepcopy(hub).double()
    acc64 = afkern.accelerate(copy.deepcopy(hub64), backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback anywhere
        o64, g64 = _compare64(hub64, acc64, spec, inputs, what=f"{name}-{variant}")
        assert calls.n > 0
        hub32 = copy.deepcopy(hub)
        acc32 = afkern.accelerate(copy.deepcopy(hub), backend="torch")
        (o32, go32), (a32, ga32) = _run(hub32, spec, inputs), _run(acc32, spec, inputs)
        assert_2x(a32.hidden, o64.hidden, o32.hidden, torch.float32, "hidden")
        zero = _zero_grads(g64)
        assert ga32.keys() == g64.keys()
        for k in zero:
            assert ga32[k].abs().max().item() <= 1e-5 * _scale(ga32), k
        for group, keys in _groups(g64.keys() - zero).items():
            cat = lambda g: torch.cat([g[k].double().flatten() for k in keys])  # noqa: E731
            assert_2x(cat(ga32), cat(g64), cat(go32), torch.float32, group)
        with torch.no_grad():  # inference: folded weights
            inf = acc32(**F.cast_inputs(inputs, torch.float32)).last_hidden_state
        assert_2x(inf, o64.hidden, o32.hidden, torch.float32, "folded")
        assert any(s.folds for s in _sites(acc32))


def _groups(keys):
    """Parameter gradients judged together in float32: per site module (a BottleneckLayer's
    adapters, a fusion) and the base model. A single bias of 8 values is too few numbers for a
    ratio of two rounding errors to mean anything; a site's adapters and its fusion are not."""
    out = {}
    for k in sorted(keys):
        if ".adapter_fusion_layer." in k:
            g = k.split(".adapter_fusion_layer.")[0] + " fusion"
        elif ".adapters." in k:
            g = k.split(".adapters.")[0] + " adapters"
        else:
            g = "base model"
        out.setdefault(g, []).append(k)
    return out


def _sites(model):
    return [m.__dict__["_afkern_accelerated"] for m in model.modules() if "_afkern_accelerated" in m.__dict__]


def test_static_fusion_bfloat16_and_output_attentions():
    spec, hub = _hub("bert", "seq_bn", "static")
    inputs = F.make_inputs(spec)
    hub64 = copy.deepcopy(hub).double()
    _compare64(hub64, afkern.accelerate(copy.deepcopy(hub64), backend="torch"), spec, inputs, what="static")
    o64 = F.run_with_grads(hub64, spec, inputs)
    ob = F.run_with_grads(copy.deepcopy(hub).to(torch.bfloat16), spec, inputs)
    ab = F.run_with_grads(afkern.accelerate(copy.deepcopy(hub).to(torch.bfloat16), backend="torch"), spec, inputs)
    assert_2x(ab.hidden.double(), o64.hidden, ob.hidden.double(), torch.bfloat16, "bf16")
    # AdapterHub's per-call fusion attentions come back from the accelerated layer
    spec, hub = _hub("bert", "double_seq_bn")
    acc = afkern.accelerate(copy.deepcopy(hub).double(), backend="torch")
    with torch.no_grad():
        want = copy.deepcopy(hub).double()(**inputs, output_adapter_fusion_attentions=True).adapter_fusion_attentions
        got = acc(**inputs, output_adapter_fusion_attentions=True).adapter_fusion_attentions
    name = ",".join(NAMES)
    assert got[name].keys() == want[name].keys() and len(want[name]) == 2
    for layer, locs in want[name].items():
        assert locs.keys() == got[name][layer].keys() == {"mh_adapter", "output_adapter"}
        for loc, p in locs.items():
            assert rel(torch.as_tensor(got[name][layer][loc]), torch.as_tensor(p)) < 1e-9


def _training_model(variant="seq_bn", adapter_dropout=0.0, family="bert"):
    """A BERT (or other family) AdapterHub model in training mode: hidden dropout, score dropout,
    temperature annealing, optionally adapter dropout; float64."""
    spec = F.FAMILIES[family]
    plain = F.make_plain(spec)
    model = copy.deepcopy(plain).float()
    adapters.init(model)
    cfg = F.adapter_config(variant)
    cfg = cfg.replace(dropout=adapter_dropout) if adapter_dropout else cfg
    for n in NAMES:
        model.add_adapter(n, config=cfg)
    model.add_adapter_fusion(Fuse(*NAMES), config=adapters.DynamicAdapterFusionConfig(temperature=True,
                                                                                        dropout_prob=0.3))
    F.perturb_adapterhub_(model)
    model.train_adapter_fusion(Fuse(*NAMES))
    model.train()
    return spec, model.double()


@pytest.mark.parametrize("variant,adapter_dropout,checkpointing", [
    ("seq_bn", 0.0, False), ("double_seq_bn", 0.1, False), ("seq_bn", 0.1, True), ("double_seq_bn", 0.0, True)])
def test_training_dropout_temperature_checkpointing(variant, adapter_dropout, checkpointing):
    """Fusion training (train_adapter_fusion freezing): hidden, adapter and score dropout under the
    same seed, the temperature annealed call by call, gradient checkpointing; three steps."""
    spec, hub = _training_model(variant, adapter_dropout)
    acc = afkern.accelerate(copy.deepcopy(hub), backend="torch")
    if checkpointing:
        hub.gradient_checkpointing_enable()
        acc.gradient_checkpointing_enable()
    inputs = F.make_inputs(spec)
    for step in range(3):
        _, grads = _compare64(hub, acc, spec, inputs, seed=100 + step, what=f"step {step}")
        assert all("adapter_fusion_layer" in k for k in grads)  # train_adapter_fusion froze the rest
    th = [m.T for m in F.fusion_modules(hub).values()]
    assert th == [m.T for m in F.fusion_modules(acc).values()] and all(t < 50.0 for t in th)


def test_single_adapter_training_and_inference():
    spec, hub = _training_model("seq_bn", 0.2)
    hub.train_adapter("b")  # single adapter active, trainable, with dropout
    acc = afkern.accelerate(copy.deepcopy(hub), backend="torch")
    inputs = F.make_inputs(spec)
    _, grads = _compare64(hub, acc, spec, inputs, seed=3, what="single")
    assert grads and all(".adapters.b." in k for k in grads)
    hub.eval(), acc.eval()
    with torch.no_grad():
        assert rel(acc(**inputs).last_hidden_state, hub(**inputs).last_hidden_state) < 1e-9


def _eval64(name="bert", variant="seq_bn"):
    spec, hub = _hub(name, variant)
    return spec, copy.deepcopy(hub).double()


def _hidden(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_enable_false_restores_adapterhub(monkeypatch):
    spec, hub = _eval64("gpt2")
    inputs = F.make_inputs(spec)
    want = _hidden(hub, inputs)
    calls = Calls(monkeypatch)
    acc = afkern.accelerate(hub, backend="torch")
    assert acc is hub and afkern.accelerate.__module__ == "afkern.accelerate"
    assert rel(_hidden(acc, inputs), want) < 1e-9 and calls.n > 0
    afkern.accelerate(acc, enable=False)
    n = calls.n
    assert torch.equal(_hidden(acc, inputs), want) and calls.n == n
    assert not any("compose" in m.__dict__ for m in acc.modules())


def test_changes_after_accelerate_are_seen():
    """An optimizer step (folded weights refresh), add_adapter + a new fusion, set_active_adapters,
    delete_adapter: each seen at the next forward. Oracle: the same model with AdapterHub's code."""
    spec, model = _eval64("bert", "double_seq_bn")
    inputs = F.make_inputs(spec)
    afkern.accelerate(model, backend="torch")

    def check(what):
        got = _hidden(model, inputs)
        ref = afkern.accelerate(copy.deepcopy(model), enable=False)
        assert rel(got, _hidden(ref, inputs)) < 1e-9, what

    check("start")
    before = _hidden(model, inputs)
    model.train_adapter_fusion(Fuse(*NAMES))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    out = model(**inputs).last_hidden_state
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)).sum().backward()
    opt.step()
    model.eval()
    after = _hidden(model, inputs)
    assert rel(after, before) > 1e-3
    check("optimizer step")
    model.add_adapter("d", config=F.adapter_config("double_seq_bn"))
    model.add_adapter_fusion(Fuse("a", "d"))
    F.perturb_adapterhub_(model.double(), seed=5)
    model.set_active_adapters(Fuse("a", "d"))
    check("add_adapter + Fuse(a, d)")
    model.set_active_adapters("c")
    check("single adapter c")
    model.delete_adapter("d")
    model.set_active_adapters(Fuse(*NAMES))
    check("delete_adapter")


def test_save_adapter_fusion_loads_into_fresh_adapterhub(tmp_path):
    spec, hub = _hub("bert", "seq_bn")
    acc = afkern.accelerate(copy.deepcopy(hub), backend="torch")
    for n in NAMES:
        acc.save_adapter(str(tmp_path / n), n)
    acc.save_adapter_fusion(str(tmp_path / "fusion"), Fuse(*NAMES))
    fresh = F.make_plain(spec)
    adapters.init(fresh)
    for n in NAMES:
        fresh.load_adapter(str(tmp_path / n))
    fresh.load_adapter_fusion(str(tmp_path / "fusion"), set_active=True)
    inputs = F.make_inputs(spec)
    assert rel(_hidden(fresh.double(), inputs), _hidden(acc.double(), inputs)) < 1e-9


def test_setups_afkern_does_not_cover_fall_back_with_one_warning():
    spec, model = _eval64("bert", "seq_bn")
    inputs = F.make_inputs(spec)
    for setup in (Stack("a", "b"), Parallel("a", "b")):
        model.set_active_adapters(setup)
        want = _hidden(model, inputs)
        afkern.accelerate(model, backend="torch")
        with pytest.warns(RuntimeWarning, match=r"Stack|Parallel") as rec:
            got = _hidden(model, inputs)
            _hidden(model, inputs)
        assert len([w for w in rec if "afkern.accelerate" in str(w.message)]) == 1
        assert torch.equal(got, want)
        afkern.accelerate(model, enable=False)


def test_bad_input_is_refused_and_changes_nothing():
    spec = F.FAMILIES["bert"]
    plain = F.make_plain(spec)
    with pytest.raises(TypeError, match="adapters.init"):
        afkern.accelerate(plain)
    with pytest.raises(TypeError, match="nn.Module"):
        afkern.accelerate("bert")
    _, hub = _eval64()
    with pytest.raises(ValueError, match="unknown backend"):
        afkern.accelerate(hub, backend="fast")
    with pytest.raises(RuntimeError, match="cannot run"):
        afkern.accelerate(hub, backend="cuda")
    assert not any("compose" in m.__dict__ for m in hub.modules())


def test_threads_with_their_own_setups():
    """AdapterHub's thread-local AdapterSetup: each thread's forward sees only its own setup."""
    spec, model = _eval64("bert", "seq_bn")
    inputs = F.make_inputs(spec)
    afkern.accelerate(model, backend="torch")
    setups = [Fuse(*NAMES), "a", Fuse(*NAMES), "b"]
    want = []
    for s in setups:
        with adapters.AdapterSetup(s):
            want.append(_hidden(model, inputs))
    got, errors = [None] * len(setups), []

    def run(i):
        try:
            with adapters.AdapterSetup(setups[i]):
                for _ in range(3):
                    got[i] = _hidden(model, inputs)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(setups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert rel(want[0], want[1]) > 1e-3


def test_accelerate_benchmark_runs_checks_and_writes(tmp_path):
    """afkern-bench --accelerate on a tiny shape: both modes checked against AdapterHub, the files
    written (no timing is asserted)."""
    import csv

    from afkern import bench

    argv = ["--accelerate", "--hidden-size", "32", "--intermediate-size", "48", "--heads", "4", "--layers", "1",
            "--model-tokens", "32", "--seq-len", "16", "--model-n-adapters", "3", "--reduction-factor", "4",
            "--repeats", "2", "--warmup", "1", "--warmup-ms", "1", "--min-sample-ms", "1", "--output-dir",
            str(tmp_path), "--no-progress"]
    assert bench.main(argv) == 0
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = list(csv.DictReader(open(folder / "accelerate.csv")))
    assert [(r["mode"], r["provider"]) for r in rows] == [
        ("inference", "adapters"), ("inference", "accelerated"), ("train_step", "adapters"), ("train_step", "accelerated")]
    assert all(r["status"] == "ok" and int(r["repeats"]) == 2 for r in rows)
    assert all(float(r["rel_err"]) < 1e-4 for r in rows if r["provider"] == "accelerated")
    assert "target >= 3x" in (folder / "accelerate.md").read_text()
