"""Smoke tests of ``afkern-bench`` at tiny sizes: it runs, writes CSV / PNG / results.md with the
documented columns, and its correctness guard refuses to time a provider that computes the wrong
function. Speed itself is never asserted here (that is what the benchmark reports)."""

import csv
import math
import os

import pytest
import torch

pytest.importorskip("matplotlib")
from afkern import bench  # noqa: E402

TINY = [
    "--device", "cpu", "--hidden-size", "32", "--intermediate-size", "48", "--heads", "2",
    "--reduction-factor", "8", "--seq-len", "8", "--repeats", "2", "--warmup", "0", "--min-sample-ms", "0.1",
    "--threads", "1", "--layers", "1", "--model-n-adapters", "3", "--model-tokens", "8",
]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    rc = bench.main(TINY + ["--n-adapters", "1,3", "--tokens", "7", "--modes", "forward,full", "--output-dir", str(out),
                            "--providers", "plain,plain_layer,adapters,reference,torch"])
    assert torch.get_num_threads() == threads, "main() must restore torch's thread count"
    return rc, out / "cpu"


def test_cli_writes_csv_png_markdown(tiny_run):
    rc, d = tiny_run
    assert rc == 0
    rows = _read(d / "bench.csv")
    assert rows and list(rows[0].keys()) == bench.CSV_COLUMNS
    for col in ("provider", "mode", "n", "tokens", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "device",
                "torch", "transformers", "adapters", "afkern", "threads"):
        assert col in rows[0]
    assert {r["kind"] for r in rows} == {"block", "model"}
    assert {(r["kind"], r["mode"]) for r in rows} == {
        ("block", "forward"), ("block", "full"), ("model", "inference"), ("model", "train_step")}
    timed = [r for r in rows if r["median_ms"]]
    assert {r["provider"] for r in timed} == {"plain", "plain_layer", "adapters", "reference", "torch"}
    for r in timed:
        assert r["status"] == "ok", r
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["peak_mem_mb"]) >= 0 and r["dtype"] == "float32" and r["device"]
        assert r["torch"] == torch.__version__ and r["threads"] == "1"
    # every fused provider was checked against the reference and is close to it
    for r in rows:
        if r["provider"] in ("adapters", "torch"):
            assert float(r["rel_err"]) < 1e-4
    # ratios are computed in the run: adapters vs itself is 1, plain vs itself is 1
    for r in timed:
        if r["provider"] == "adapters":
            assert math.isclose(float(r["speedup_vs_adapters"]), 1.0)
        if r["provider"] == "plain":
            assert math.isclose(float(r["ratio_to_plain"]), 1.0)
    n_block = {int(r["n"]) for r in rows if r["kind"] == "block" and r["provider"] == "torch"}
    assert n_block == {1, 3}
    for name in ("block_forward_t7.png", "block_full_t7.png", "model_ratio.png"):
        with open(d / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    md = (d / "results.md").read_text()
    assert "| provider |" in md and "slope" in md
    assert not [p for p in os.listdir(d) if p.startswith(".tmp-")], "atomic writes left temporary files"


def test_linear_fit_recovers_a_line():
    rows = [dict(kind="block", provider="torch", mode="forward", tokens=7, n=n, status="ok", median_ms=2.0 + 0.5 * n)
            for n in (1, 2, 4)]
    rows.append(dict(kind="block", provider="plain_layer", mode="forward", tokens=7, n=0, status="ok", median_ms=10.0))
    (fit,) = bench.linear_fits(rows)
    assert math.isclose(fit["slope_ms"], 0.5, rel_tol=1e-9) and math.isclose(fit["intercept_ms"], 2.0, rel_tol=1e-9)
    assert math.isclose(fit["slope_pct_of_layer"], 5.0, rel_tol=1e-9)


def test_guard_rejects_a_wrong_provider(tmp_path, monkeypatch):
    torch_build = bench.PROVIDERS["torch"].build

    def wrong(setup, kind):
        r = torch_build(setup, kind)
        inner = r.fn
        # a small error (1e-3 of the output scale): large against float32 rounding
        return bench.Runner(lambda *xs: inner(*xs) * 1.001, r.fusion_params)

    def broken(setup, kind):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(bench.PROVIDERS, "wrong", bench.Provider("wrong", wrong))
    monkeypatch.setitem(bench.PROVIDERS, "broken", bench.Provider("broken", broken))
    rc = bench.main(TINY + ["--n-adapters", "3", "--tokens", "5", "--modes", "backward", "--no-model", "--no-plots",
                            "--providers", "torch,wrong,broken,adapters", "--output-dir", str(tmp_path)])
    assert rc == 0
    rows = {r["provider"]: r for r in _read(tmp_path / "cpu" / "bench.csv")}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["median_ms"]
    assert rows["wrong"]["status"].startswith("mismatch") and rows["wrong"]["median_ms"] == ""
    assert float(rows["wrong"]["rel_err"]) > 1e-4
    assert rows["broken"]["status"].startswith("error: RuntimeError: kernel exploded") and rows["broken"]["median_ms"] == ""
    # speed-ups are relative to adapters measured in the same run
    assert float(rows["torch"]["speedup_vs_adapters"]) > 0


def test_unavailable_and_bad_options(tmp_path, capsys):
    rc = bench.main(TINY + ["--n-adapters", "2", "--tokens", "4", "--modes", "forward", "--no-model", "--no-plots",
                            "--providers", "torch,cuda", "--clock", "process", "--output-dir", str(tmp_path)])
    assert rc == 0
    rows = {r["provider"]: r for r in _read(tmp_path / "cpu" / "bench.csv")}
    assert rows["cuda"]["status"].startswith("unavailable:") and "CUDA" in rows["cuda"]["status"]
    assert rows["torch"]["clock"] == "process" and float(rows["torch"]["median_ms"]) > 0
    with pytest.raises(SystemExit, match="unknown provider"):
        bench.main(["--providers", "nope"])
    with pytest.raises(SystemExit, match="multiple of --seq-len"):
        bench.main(["--tokens", "200", "--seq-len", "128"])
    with pytest.raises(SystemExit, match="--modes"):
        bench.main(["--modes", "sideways"])
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--quick", "--output-dir", "--device", "--dtype", "--providers", "--n-adapters", "--tokens"):
        assert opt in out


def test_cpu_peak_memory_counts_the_call_only():
    keep = []

    def call():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a + 1  # 4 MiB more while a lives
        keep.append(torch.ones(256, 1024))  # 1 MiB that outlives the call
        return b.sum()

    # the same call measured twice gives the same peak (the profiler's counter is not reset
    # between sessions; the measurement must not drift with it)
    got = [bench.peak_memory_mb(call, torch.device("cpu")) for _ in range(2)]
    for g in got:
        assert 9.0 <= g < 9.1, got


def test_paired_ratio_cancels_a_slow_round():
    # round 2 ran while the machine was busy: both providers were 10x slower in it
    fast, base = [1.0, 10.0, 1.1], [2.0, 20.0, 2.2]
    assert math.isclose(bench.paired_ratio(fast, base), 0.5)
