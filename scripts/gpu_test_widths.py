"""GPU checks at model widths: every backend against a float64 oracle (pytest file, listed in
scripts/gpu_tests.txt; run by the ``tests`` stage of scripts/gpu_validate.sh).

tests/ checks the kernels at odd shapes and at BERT-base width; this file adds the model widths
on the device: BERT-base (d 768, intermediate 3072, r 48) and BERT-large (1024, 4096, 64) at
N = 16, N = 64 (the kernels' limit: two adapters per lane in the warp softmax) and N = 3, an odd
token count, float32 / bfloat16 / float16, for backends torch, triton (compiled) and cuda (the
extension's ops), in both forms a block runs: ``infer`` (no-grad forward: the folded weights) and
``train`` (forward + backward with the fusion trainable: the unfolded path and every backward
kernel). Oracle: the same block in float64 with backend ``reference``. Judge (the rule of
tests/test_triton_fusion.py and afkern-bench): for every quantity (the output; in ``train`` the
gradients of both inputs and of every parameter), the backend's relative error is at most twice
the larger of the errors of the reference path and the torch path in the same dtype, plus a
per-dtype floor. A gradient that is zero in exact arithmetic (the key bias: it shifts every score
equally) is measured against 1% of the largest parameter gradient.

Also: a tuned-config file (kernels/tuned.py) forces the configs the Triton autotuners take.

On a CPU with AFKERN_GPU_DRY=1 (the dry run of the stage; TRITON_INTERPRET=1 set by the caller)
the same checks run at tiny widths for torch and triton; without it the file skips.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import afkern
from afkern.backends import backend_status

DRY = os.environ.get("AFKERN_GPU_DRY") == "1"
if torch.cuda.is_available() and not DRY:
    DEVICE = "cuda"
elif DRY:
    DEVICE = "cpu"
else:
    pytest.skip("GPU checks: no CUDA device (AFKERN_GPU_DRY=1 runs them on a CPU at tiny widths)",
                allow_module_level=True)

# (d, intermediate, N, tokens)
WIDTHS = {
    "bert-base-N16": (768, 3072, 16, 123),
    "bert-large-N16": (1024, 4096, 16, 123),
    "bert-base-N64": (768, 3072, 64, 77),
    "bert-large-N3-T1": (1024, 4096, 3, 1),
}
if DRY:
    WIDTHS = {"tiny-N3": (32, 48, 3, 7), "tiny-N16-T1": (48, 64, 16, 1)}
BACKENDS = ["torch", "triton", "cuda"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_FLOOR = 1e-2  # of the largest parameter gradient, for gradients that vanish in exact arithmetic

_ORACLES = {}


def _oracle(width: str):
    """(float64 block, inputs h, x, cotangent dy, float64 results of both forms) of a width."""
    if width not in _ORACLES:
        d, inter, n, T = WIDTHS[width]
        torch.manual_seed(0)
        blk = afkern.FusedAdapterBlock(d, [f"t{i}" for i in range(n)], in_features=inter, layer_norm_eps=1e-5)
        blk = blk.to(device=DEVICE, dtype=torch.float64).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in blk.named_parameters():
                if name.startswith("dense") or "LayerNorm" in name:
                    continue
                scale = 0.02 if (".query." in name or ".key." in name) and p.dim() > 1 else 0.05
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(DEVICE) * scale)
        h = torch.randn(T, inter, generator=g, dtype=torch.float64).to(DEVICE)
        x = torch.randn(T, d, generator=g, dtype=torch.float64).to(DEVICE)
        dy = torch.randn(T, d, generator=g, dtype=torch.float64).to(DEVICE)
        blk.set_backend("reference")
        _ORACLES[width] = (blk, h, x, dy, {f: _run(blk, h, x, dy, f) for f in ("infer", "train")})
    return _ORACLES[width]


def _run(blk, h, x, dy, form):
    """{quantity: tensor}: the output; in ``train`` also the gradients of h, x and every parameter."""
    if form == "infer":
        with torch.no_grad():
            return {"out": blk(h, x).detach()}
    for p in blk.parameters():
        p.grad = None
    hh, xx = h.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    out = blk(hh, xx)
    out.backward(dy.to(out.dtype))
    res = {"out": out.detach(), "grad h": hh.grad, "grad input_tensor": xx.grad}
    res.update({f"grad {n}": p.grad for n, p in blk.named_parameters() if p.grad is not None})
    return res


def _errors(got: dict, ref: dict) -> dict:
    big = max([v.double().norm().item() for k, v in ref.items() if k.startswith("grad ") and k not in
               ("grad h", "grad input_tensor")] + [0.0])
    out = {}
    for k, v in ref.items():
        mine = got.get(k)
        if mine is None:  # no gradient path (the key bias where it cancels): zero
            if not k.startswith("grad "):
                out[k] = float("inf")
                continue
            mine = torch.zeros_like(v)
        num = (mine.double() - v.double()).norm().item()
        den = v.double().norm().item()
        if k.startswith("grad ") and k not in ("grad h", "grad input_tensor"):
            den = max(den, GRAD_FLOOR * big)
        out[k] = num / den if den > 0 else num
    return out


def _in_dtype(blk, dtype, backend):
    b = copy.deepcopy(blk).to(dtype)
    b.set_backend(backend)
    return b


@pytest.mark.parametrize("form", ["infer", "train"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", list(WIDTHS))
def test_backend_at_model_width(width, backend, dtype, form):
    ok, why = backend_status(backend, DEVICE)
    if not ok:
        if backend == "cuda" and DEVICE == "cuda" and os.environ.get("AFKERN_EXPECT_EXTENSION") == "1":
            pytest.fail(f"the cuda backend cannot run although the extension is expected: {why}")
        pytest.skip(f"backend {backend} cannot run here: {why}")
    blk64, h, x, dy, exact = _oracle(width)
    hd, xd, dyd = h.to(dtype), x.to(dtype), dy.to(dtype)
    ref_err = _errors(_run(_in_dtype(blk64, dtype, "reference"), hd, xd, dyd, form), exact[form])
    tor_err = ref_err if backend == "torch" else _errors(_run(_in_dtype(blk64, dtype, "torch"), hd, xd, dyd, form), exact[form])
    blk = _in_dtype(blk64, dtype, backend)
    got = _run(blk, hd, xd, dyd, form)
    assert blk.resolved_backend(h.device, dtype) == backend
    assert got["out"].dtype == dtype and torch.isfinite(got["out"]).all()
    err = _errors(got, exact[form])
    bad = []
    for k, e in err.items():
        base = ref_err[k] if backend == "torch" else max(ref_err[k], tor_err[k])
        bound = 2 * base + FLOOR[dtype]
        if not e <= bound:
            bad.append(f"{k}: {e:.3g} > {bound:.3g} (reference {ref_err[k]:.3g}, torch {tor_err[k]:.3g})")
    assert not bad, f"{backend} {form} {dtype} {width}: " + "; ".join(bad)


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton's autotuner benchmarks only on a GPU")
def test_tuned_file_forces_the_triton_configs(tmp_path, monkeypatch):
    from afkern.kernels import fusion_core as fc, tuned
    from afkern.kernels.common import arch

    d, inter, n, T = WIDTHS["bert-base-N16"]
    blk64, h, x, dy, exact = _oracle("bert-base-N16")
    dt = torch.bfloat16
    a = arch(torch.device(DEVICE))
    sc, mc = fc.scores_configs(a, False), fc.mix_configs(a, False)
    r = blk64.bottleneck
    ks = tuned.entry_key("scores", a, "bfloat16", [("D", d), ("R", r), ("BLOCK_R", fc.block_r(r)), ("STORE_G", 1)])
    km = tuned.entry_key("mix", a, "bfloat16", [("D", d), ("R", r), ("NADP", n), ("APPLY_ACT", 0)])
    want_s, want_m = sc[-1], mc[-1]  # not the first candidates: the choice must come from the file
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"entries": {ks: {"config": tuned.config_dict(want_s)},
                                            km: {"config": tuned.config_dict(want_m)}}}))
    monkeypatch.setenv(tuned.ENV, str(path))
    saved = dict(fc._TUNED)
    fc._TUNED.clear()
    try:
        blk = _in_dtype(blk64, dt, "triton")
        got = _run(blk, h.to(dt), x.to(dt), dy.to(dt), "infer")
        chosen_s = list(fc._TUNED[("scores", a, False)].cache.values())
        chosen_m = list(fc._TUNED[("mix", a, False)].cache.values())
    finally:
        fc._TUNED.clear()
        fc._TUNED.update(saved)
    assert [tuned.config_dict(c) for c in chosen_s] == [tuned.config_dict(want_s)]
    assert [tuned.config_dict(c) for c in chosen_m] == [tuned.config_dict(want_m)]
    assert _errors(got, exact["infer"])["out"] < 3e-2


@pytest.mark.skipif(DEVICE != "cuda", reason="the candidate lists are real only on a GPU")
@pytest.mark.parametrize("which", ["scores", "mix"])
@pytest.mark.parametrize("form", ["infer", "train"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
def test_every_triton_candidate_config_is_correct(which, form, dtype, tmp_path, monkeypatch):
    """Autotuning checks no output: each candidate of scores_configs / mix_configs (the other
    kernel at its first candidate), forced through a tuned-config file, computes the block within
    the rule above at BERT-base width."""
    from afkern.kernels import fusion_core as fc, tuned
    from afkern.kernels.common import arch

    width = "bert-base-N16"
    d, inter, n, T = WIDTHS[width]
    blk64, h, x, dy, exact = _oracle(width)
    hd, xd, dyd = h.to(dtype), x.to(dtype), dy.to(dtype)
    a, fp32, r = arch(torch.device(DEVICE)), dtype == torch.float32, blk64.bottleneck
    dname = str(dtype).replace("torch.", "")
    infer = form == "infer"
    ks = tuned.entry_key("scores", a, dname, [("D", d), ("R", r), ("BLOCK_R", fc.block_r(r)), ("STORE_G", int(infer))])
    km = tuned.entry_key("mix", a, dname, [("D", d), ("R", r), ("NADP", n), ("APPLY_ACT", int(not infer))])
    sc, mc = fc.scores_configs(a, fp32), fc.mix_configs(a, fp32)
    ref_err = _errors(_run(_in_dtype(blk64, dtype, "reference"), hd, xd, dyd, form), exact[form])
    tor_err = _errors(_run(_in_dtype(blk64, dtype, "torch"), hd, xd, dyd, form), exact[form])
    saved = dict(fc._TUNED)
    bad = []
    try:
        for i, cand in enumerate(sc if which == "scores" else mc):
            chosen = {ks: sc[0], km: mc[0], (ks if which == "scores" else km): cand}
            path = tmp_path / f"c{i}.json"
            path.write_text(json.dumps({"entries": {k: {"config": tuned.config_dict(c)} for k, c in chosen.items()}}))
            monkeypatch.setenv(tuned.ENV, str(path))
            fc._TUNED.clear()
            err = _errors(_run(_in_dtype(blk64, dtype, "triton"), hd, xd, dyd, form), exact[form])
            taken = [tuned.config_dict(c) for c in fc._TUNED[(which, a, fp32)].cache.values()] or \
                [tuned.config_dict(c) for c in fc._TUNED[(which, a, fp32)].configs]
            assert tuned.config_dict(cand) in taken, f"candidate {i} was not the one launched: {taken}"
            for k, e in err.items():
                bound = 2 * max(ref_err[k], tor_err[k]) + FLOOR[dtype]
                if not e <= bound:
                    bad.append(f"candidate {i} {tuned.config_dict(cand)}: {k} {e:.3g} > {bound:.3g}")
    finally:
        fc._TUNED.clear()
        fc._TUNED.update(saved)
    assert not bad, "; ".join(bad[:6])
