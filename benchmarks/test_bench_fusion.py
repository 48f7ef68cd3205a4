"""pytest-benchmark suite for the key cases: ``pytest benchmarks/ --benchmark-only``.

Not part of the test suite (``testpaths = ["tests"]``). Cases, at BERT-base width (d=768,
intermediate 3072, r=48) on the default device (CUDA if present, else CPU) in float32 on CPU and
bfloat16 on CUDA:

- ``block``: the fused BertOutput block at N=16, forward (inference, no grad) and full (forward +
  backward of fusion training), per provider (AdapterHub ``adapters``, afkern backends that can run
  here, and the plain BertOutput);
- ``model``: a 4-layer BERT with Fuse(16) against the plain model, inference.

Every provider is checked with ``afkern.bench.check_provider`` against a float64 run of afkern's
reference (no worse than twice the error of the reference path in the run's dtype, or a small
floor; ``afkern/bench/check.py``) before it is timed; a mismatch fails the case. Every case is
warmed up as ``afkern-bench`` does (``afkern.bench.warm_up``) before pytest-benchmark times it.
Sizes: ``AFKERN_BENCH_TOKENS`` (default 256) tokens for both, ``AFKERN_BENCH_LAYERS`` (default 4)
layers. The full sweep with plots is ``afkern-bench``.
"""

import os

import pytest
import torch

from afkern import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOKENS = int(os.environ.get("AFKERN_BENCH_TOKENS", "256"))
LAYERS = int(os.environ.get("AFKERN_BENCH_LAYERS", "4"))
SEQ = min(128, TOKENS)
N = 16
BLOCK_PROVIDERS = ["plain", "adapters", "reference", "torch", "triton", "cuda"]
MODEL_PROVIDERS = ["plain", "adapters", "torch", "triton", "cuda"]


def _prepared(kind, layers):
    setup = bench.Setup(bench.BenchShape(), N, layers, SEQ, DEVICE, DTYPE)
    inputs, dy, _ = bench.make_inputs(setup, kind, TOKENS, SEQ, seed=1)
    oracle = bench.make_oracle(setup, kind, inputs, dy, grads=True)
    return setup, inputs, dy, oracle, {}


@pytest.fixture(scope="module")
def block_setup():
    return _prepared("block", 1)


@pytest.fixture(scope="module")
def model_setup():
    return _prepared("model", LAYERS)


def _runner(prepared, kind, name):
    setup, inputs, dy, oracle, cache = prepared
    if name not in cache:
        try:
            runner = bench.PROVIDERS[name].build(setup, kind)
        except bench.ProviderUnavailable as exc:
            cache[name] = ("unavailable", str(exc))
        else:
            status = "ok"
            if bench.PROVIDERS[name].checked:
                status, err = bench.check_provider(runner, oracle, inputs, dy, grads=True)
            cache[name] = (status, runner)
    status, val = cache[name]
    if status == "unavailable":
        pytest.skip(f"{name}: {val}")
    assert status == "ok", f"provider {name} disagrees with the float64 reference: {status}"
    return val


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _warm_call(runner, inputs, dy, mode):
    call = bench.prepare_call(runner, inputs, dy, mode)()
    bench.warm_up({"case": call}, warmup=10 if DEVICE.type == "cuda" else 2, warmup_ms=bench.default_warmup_ms(DEVICE),
                  device=DEVICE)
    return call


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", BLOCK_PROVIDERS)
def test_block_n16(benchmark, block_setup, provider, mode):
    runner = _runner(block_setup, "block", provider)
    _, inputs, dy, _, _ = block_setup
    call = _warm_call(runner, inputs, dy, mode)
    benchmark.group = f"block N={N} {TOKENS} tok {mode} {str(DTYPE).replace('torch.', '')} {DEVICE.type}"
    benchmark.extra_info.update(provider=provider, mode=mode, n=N, tokens=TOKENS, device=bench.device_name(DEVICE))
    benchmark(lambda: (call(), _sync()))


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
def test_model_fuse16_inference(benchmark, model_setup, provider):
    runner = _runner(model_setup, "model", provider)
    _, inputs, dy, _, _ = model_setup
    call = _warm_call(runner, inputs, dy, "inference")
    benchmark.group = f"model {LAYERS} layers Fuse({N}) {TOKENS} tok inference {str(DTYPE).replace('torch.', '')} {DEVICE.type}"
    benchmark.extra_info.update(provider=provider, n=N, tokens=TOKENS, layers=LAYERS, device=bench.device_name(DEVICE))
    benchmark(lambda: (call(), _sync()))
