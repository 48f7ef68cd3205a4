"""``afkern-bench --decode`` (issue 18, item 3) at tiny sizes: the case runs and writes well-formed
rows (CSV and JSON); afkern and AdapterHub, loaded from the directories afkern saved, generate the
same tokens greedily with the KV cache in float64 and float32, each within the float64 oracle's
bounds; and the guard refuses a model that computes another function. No timing is asserted (that
is what the benchmark reports)."""

import csv
import json
import math

import pytest
import torch

pytest.importorskip("adapters")
from afkern import bench  # noqa: E402
from afkern.bench import decode  # noqa: E402
from afkern.bench.models import BenchShape  # noqa: E402

SHAPE = BenchShape(hidden=40, intermediate=56, heads=4, reduction_factor=8)  # head dim 10, bottleneck 5
TINY = ["--decode", "--device", "cpu", "--hidden-size", "40", "--intermediate-size", "56", "--heads", "4",
        "--reduction-factor", "8", "--layers", "2", "--model-n-adapters", "3", "--vocab-size", "61",
        "--prompt-len", "7", "--new-tokens", "5", "--decode-batch", "1,3", "--repeats", "2", "--warmup", "0",
        "--warmup-ms", "0", "--min-sample-ms", "0.1", "--threads", "1"]


def _models(dtype, seed=0):
    return decode.build_models(SHAPE, 3, 2, 61, "cpu", dtype, seed)


def test_decode_case_runs_tiny_and_writes_rows(tmp_path):
    threads = torch.get_num_threads()
    rc = bench.main(TINY + ["--output-dir", str(tmp_path)])
    assert rc == 0 and torch.get_num_threads() == threads
    folder = tmp_path / bench.device_slug(torch.device("cpu"))
    with open(folder / "decode.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == decode.COLUMNS
    assert [(r["batch"], r["provider"]) for r in rows] == [(b, p) for b in ("1", "3") for p in decode.PROVIDERS]
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["prompt_len"], r["new_tokens"], r["n_adapters"], r["layers"], r["vocab"]) == ("7", "5", "3", "2", "61")
        assert int(r["repeats"]) == 2 and r["dtype"] == "float32" and r["backend"] == "torch"
        ms, p20, p80, call = (float(r[k]) for k in ("ms_per_token", "p20_ms_per_token", "p80_ms_per_token", "call_ms"))
        assert 0 < p20 <= ms <= p80 and math.isclose(ms * 5, call, rel_tol=1e-4)
        # tokens/s: batch tokens per ms/token, its p20-p80 from ms/token's p80-p20
        b = int(r["batch"])
        assert math.isclose(float(r["tokens_per_s"]), b * 1e3 / ms, rel_tol=1e-4)
        assert math.isclose(float(r["p20_tokens_per_s"]), b * 1e3 / p80, rel_tol=1e-4)
        assert float(r["ratio_to_plain"]) > 0 and float(r["speedup_vs_adapters"]) > 0
        # the prefill timed in the same group: one decoding step = (generate - prefill) / (new tokens - 1)
        step, pre = float(r["decode_ms_per_step"]), float(r["prefill_ms"])
        assert pre > 0 and float(r["p20_decode_ms_per_step"]) <= step <= float(r["p80_decode_ms_per_step"])
        assert float(r["decode_ratio_to_plain"]) > 0
    for r in rows:
        if r["provider"] == "plain":
            assert float(r["ratio_to_plain"]) == 1.0 == float(r["decode_ratio_to_plain"]) and r["rel_err"] == ""
        elif r["provider"] in ("gemm_floor", "hooks_floor"):  # cost floors, timed and never checked
            assert r["rel_err"] == ""
        else:  # checked against the float64 oracle before timing
            assert 0 <= float(r["rel_err"]) <= max(2 * float(r["ref_rel_err"]), 1e-5)
    doc = json.loads((folder / "decode.json").read_text())
    assert len(doc["rows"]) == len(rows) and doc["meta"]["dtype"] == "float32"
    assert "afkern / plain per token" in doc["summary"] and doc["command"].startswith("afkern-bench --decode")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_afkern_and_adapterhub_generate_the_same_tokens(dtype):
    fm, am, why, pm = _models(dtype)
    assert am is not None, why
    ids = decode.make_prompt(3, 7, 61, 0, "cpu")
    res = decode.check(fm, am, ids, 9)
    for name in ("afkern", "adapters", "reference"):
        assert res[name]["status"] == "ok", res[name]["status"]
    assert torch.equal(res["afkern"]["sequences"], res["adapters"]["sequences"])
    assert res["afkern"]["sequences"].shape == (3, 7 + 9)
    if dtype == torch.float64:
        assert res["afkern"]["rel_err"] < 1e-9 and res["adapters"]["rel_err"] < 1e-9
    else:  # against the float64 truth: no worse than twice AdapterHub's own float32 error, plus a floor
        assert res["afkern"]["rel_err"] <= 2 * res["adapters"]["rel_err"] + 1e-6
        assert res["adapters"]["rel_err"] > 0  # float32 really ran in float32
    # the adapters and the fusion act: the logits are far from the plain model's
    seq = res["afkern"]["sequences"]
    assert bench.rel_err(decode.cached_logits(fm, seq, 7), decode.cached_logits(pm, seq, 7)) > 1e-2


def test_fusion_weights_are_not_degenerate():
    """The perturbed fusion's softmax is far from uniform (a uniform p hides a wrong score path)."""
    import afkern

    fm, _, _, _ = _models(torch.float64)
    ids = decode.make_prompt(1, 7, 61, 0, "cpu")
    afkern.record_fusion_weights(fm)
    with torch.no_grad():
        fm(ids)
    p = torch.cat([b.fusion_weights.reshape(-1, 3) for _, b in afkern.fused_blocks(fm)])
    assert p.shape == (2 * 7, 3) and torch.allclose(p.sum(-1), torch.ones(14, dtype=p.dtype))
    assert (p.max(-1).values - p.min(-1).values).mean() > 0.1


def test_guard_refuses_a_model_that_computes_another_function():
    fm, am, _, _ = _models(torch.float32)
    ids = decode.make_prompt(1, 7, 61, 0, "cpu")
    layer = am.transformer.h[1].output_adapters.adapter_fusion_layer["f0"]
    with torch.no_grad():
        layer.query.weight.mul_(3.0)  # AdapterHub's scores now differ from afkern's
    res = decode.check(fm, am, ids, 9)
    assert res["afkern"]["status"] == "ok"
    assert res["adapters"]["status"].startswith("mismatch"), res["adapters"]


def test_bad_decode_options_are_refused(tmp_path):
    for extra, msg in ((["--decode-batch", "0"], "--decode-batch"), (["--new-tokens", "0"], "--new-tokens"),
                       (["--multifusion"], "choose one")):
        with pytest.raises(SystemExit, match=msg):
            bench.main(TINY + extra + ["--output-dir", str(tmp_path)])


def test_gemm_floor_runs_only_the_two_gemms():
    """The floor provider's blocks compute x + relu((x w_in + b_in)[:, :N r]) Wu, x = h + r, from
    the block's own folded weights (so it streams the same bytes as afkern's folded layer)."""
    fm, _, _, _ = _models(torch.float64)
    floor = decode.gemm_floor(fm)
    import afkern

    (_, b), (_, b0) = next(afkern.fused_blocks(floor)), next(afkern.fused_blocks(fm))
    g = torch.Generator().manual_seed(3)
    h, r = (torch.randn(2, 3, b.hidden_size, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        fw = b0.folded_weights()
        nr = b0.n_adapters * b0.bottleneck
        x = (h + r).reshape(-1, b.hidden_size)
        want = x + torch.relu(x @ fw.w_in[:, :nr] + fw.b_in[:nr]) @ fw.w_out[:nr]
        got = b.adapter_forward(h, r)
    assert torch.allclose(got.reshape(want.shape), want, rtol=0, atol=1e-12)
    assert not torch.allclose(got, b0.adapter_forward(h, r)), "the floor must not be AdapterFusion"


def test_hooks_floor_is_the_plain_model_through_the_hooks():
    """The hooks floor's blocks return h + r, so the model computes the plain model's logits bit for
    bit (GPT-2's block adds ``residual + mlp``; IEEE addition commutes) while every site hook runs."""
    fm, _, _, pm = _models(torch.float32)
    floor = decode.hooks_floor(fm)
    import afkern
    from afkern.sites import layer_hooks

    assert len(list(layer_hooks(floor))) == len(list(layer_hooks(fm))) > 0
    ids = decode.make_prompt(2, 7, 61, 0, "cpu")
    with torch.no_grad():
        want, got, fused = (m(ids).logits for m in (pm, floor, fm))
    assert torch.equal(got, want)
    assert not torch.equal(fused, want), "afkern's own model must differ from the plain one (perturbed adapters)"
    assert all(type(b).__name__ == "FusedAdapterBlock" for _, b in afkern.fused_blocks(floor))
