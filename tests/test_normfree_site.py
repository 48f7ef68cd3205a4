"""The norm-free site (``LayerSpec.layer_norm=False``) on every backend, at the kernel level.

Pre-LN families (GPT-2, Llama, Mistral, Qwen2, T5, ViT) hand AdapterHub's adapters
``layer_norm=None`` (docs/DESIGN.md section 6): ``x = h + residual_input`` and
``out = ctx + residual_input`` without a norm. Here the layer of each backend, on such a site,
against the float64 reference (``afkern/ops/reference.py``):

* torch (``backends/torch_ops``): float64 to 1e-9, float32 and bfloat16 by the flash-attention
  rule, unfolded (training) and folded (inference);
* triton (``backends/triton_ops``, the Triton interpreter on CPU; real kernels with
  AFKERN_TEST_GPU=1 on a GPU): float32 and bfloat16, unfolded and folded, every gradient;
* cuda (the ``torch.ops.afkern`` row-op path of ``backends/cuda_ops``; on CPU through the ops'
  reference kernels, on a GPU through the extension when built): float64, float32, bfloat16;
* the block: ``FusedAdapterBlock(wrap_output=False)`` with no norm attached, every backend.

Judge (tests/parity.py, STYLE.md habit 7): the error against float64 is at most 2x the naive
reference's own error in the same dtype plus a floor of a few eps; in float64 the paths agree to
1e-9 relative. The loss reaches the output and the fusion probabilities.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import afkern
from afkern.backends import cuda_ops as _cuda
from afkern.backends.torch_ops import layer as torch_layer
from afkern.ops.fold import fold_weights
from afkern.ops.layer import fusion_layer
from afkern.ops.reference import fusion_layer_reference

from conftest import make_params, make_spec
from parity import CONFIGS as SHARED, assert_f64, judge, judge_all, judge_block, run_layer

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERP else ("cuda" if torch.cuda.is_available() else None)
try:
    import triton  # noqa: F401
    from afkern.backends import triton_ops
except Exception:  # pragma: no cover - no triton in this environment
    triton_ops, TRITON_DEVICE = None, None
EXT_OK, _ = _cuda.extension_status()
CUDA_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and EXT_OK else [])

T, N, R, D = 7, 3, 5, 40

# the AdapterHub flag combinations a norm-free site meets (docs/FAMILIES.md section 1; the
# configs of tests/parity.py under their placement names)
CONFIGS = {
    "pfeiffer": dict(),                                   # F(h+r) + h + r
    "houlsby": SHARED["houlsby"],                         # F(h) + h + r
    "residual_after_ln": SHARED["residual_after_ln"],     # F(h+r) + h + 2r
    "no_ln_after": SHARED["no_ln_after"],                 # F(h+r) + h
    **{k: SHARED[k] for k in ("residual_before", "query_before_ln", "static", "single_adapter")},
}


def _spec(cfg):
    return make_spec(N, R, D, layer_norm=False, **cfg)


def _params(cfg, dtype, device="cpu"):
    P = make_params(N, R, D, dtype=torch.float64, value=cfg.get("value", True))
    P = dataclasses.replace(P, ln_weight=None, ln_bias=None)  # a norm-free site has no norm weights
    return dataclasses.replace(P, **{k: (None if v is None else v.to(device, dtype)) for k, v in P.__dict__.items()})


def _inputs(dtype, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, D, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(3)]  # h, x, dout


def _mask(spec, device):
    if not spec.fusion:
        return None
    g = torch.Generator().manual_seed(9)
    return ((torch.rand(T, N, generator=g) >= 0.3).float() / 0.7).to(device)


def _run(fn, h, x, dout, P, spec, M, folded=None, grad=True):
    """(out, probs, {leaf: grad}) of one layer call on fresh leaves (tests/parity.py ``run_layer``)."""
    return run_layer(fn, h, x, P, spec, 0.8, M, folded, grad=grad, dout=dout)


def _compare(fn, dtype, cfg, device="cpu", folded=False):
    spec = _spec(cfg)
    P, P64 = _params(cfg, dtype, device), _params(cfg, torch.float64, device)
    h, x, dout = _inputs(dtype, device)
    M = None if folded else _mask(spec, device)
    fw = fold_weights(P, spec) if folded and spec.fusion else None
    fw64 = fold_weights(P64, spec) if folded and spec.fusion else None
    grad = not folded
    reference = lambda *a: fusion_layer_reference(*a[:6])  # noqa: E731 (no folded form)
    ref = _run(reference, h.double(), x.double(), dout, P64, spec, M, grad=grad)
    base = _run(reference, h, x, dout, P, spec, M, grad=grad)  # the oracle in this dtype
    got = _run(fn, h, x, dout, P, spec, M, fw if fn is not torch_layer else fw64 if dtype == torch.float64 else fw,
               grad=grad)
    assert got[0].dtype == dtype and got[0].shape == (T, D)
    judge("out", got[0], base[0], ref[0], dtype)
    if spec.fusion:
        judge("probs", got[1], base[1], ref[1], dtype)
    judge_all("d", got[2], base[2], ref[2], dtype)


def test_reference_is_adapterhubs_norm_free_formula():
    """The oracle itself: Pfeiffer at a norm-free site is F(h + r) + h + r (docs/FAMILIES.md section 1)."""
    spec = _spec({})
    P = _params({}, torch.float64)
    h, x, _ = _inputs(torch.float64)
    out, p = fusion_layer_reference(h, x, P, spec, 1.0)
    q = torch.nn.functional.linear(h + x, P.query_weight, P.query_bias)
    ups = [torch.relu((h + x) @ P.down_weight[n].t() + P.down_bias[n]) @ P.up_weight[n] + P.up_bias[n] for n in range(N)]
    keys = [torch.nn.functional.linear(u, P.key_weight, P.key_bias) for u in ups]
    probs = torch.softmax(torch.stack([(q * k).sum(-1) for k in keys], -1), -1)
    ctx = sum(probs[:, n:n + 1] * (ups[n] @ P.value_weight.t()) for n in range(N))
    torch.testing.assert_close(out, ctx + h + x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(p.double(), probs, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------- torch


def _cases(names, dtypes):
    """(name, dtype) pairs: every config in the wide dtypes, the two placements in bfloat16."""
    return [(n, dt) for dt in dtypes for n in names if dt != torch.bfloat16 or n in ("pfeiffer", "houlsby")]


@pytest.mark.parametrize("name,dtype", _cases(list(CONFIGS), [torch.float64, torch.float32, torch.bfloat16]))
def test_torch_layer(name, dtype):
    _compare(torch_layer, dtype, CONFIGS[name])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["pfeiffer", "houlsby", "residual_before", "query_before_ln", "static"])
def test_torch_layer_folded(name, dtype):
    _compare(torch_layer, dtype, CONFIGS[name], folded=True)


# ---------------------------------------------------------------------------------------- triton


@pytest.mark.skipif(TRITON_DEVICE is None, reason="the triton backend needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name,dtype", _cases(["pfeiffer", "houlsby", "residual_after_ln", "no_ln_after",
                                                 "residual_before", "single_adapter"], [torch.float32, torch.bfloat16]))
def test_triton_layer(name, dtype):
    _compare(triton_ops.layer, dtype, CONFIGS[name], device=TRITON_DEVICE)


@pytest.mark.skipif(TRITON_DEVICE is None, reason="the triton backend needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["pfeiffer", "houlsby", "query_before_ln"])
def test_triton_layer_folded(name, dtype):
    _compare(triton_ops.layer, dtype, CONFIGS[name], device=TRITON_DEVICE, folded=True)


# ---------------------------------------------------------------------------------------- cuda ops


def _cuda_layer(device):
    if device == "cuda":
        return _cuda.layer
    return lambda h, x, P, spec, *a: fusion_layer(h, x, P, spec, _cuda.PRIMITIVES, *a)


@pytest.mark.parametrize("device,name,dtype", [
    (dev, n, dt) for dev in CUDA_DEVICES
    for n, dt in _cases(["pfeiffer", "houlsby", "residual_after_ln", "no_ln_after", "single_adapter"],
                        [torch.float64, torch.float32, torch.bfloat16])
    if not (dev == "cuda" and dt == torch.float64)])  # the CUDA kernels take float32 / bfloat16 / float16
def test_cuda_ops_layer(name, dtype, device):
    _compare(_cuda_layer(device), dtype, CONFIGS[name], device=device)


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ops_layer_folded(dtype, device):
    _compare(_cuda_layer(device), dtype, CONFIGS["pfeiffer"], device=device, folded=True)


# ---------------------------------------------------------------------------------------- block


def _backends():
    out = ["reference", "torch"]
    if TRITON_DEVICE == "cpu":
        out.append("triton")
    return out


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_block_without_norm_every_backend(placement):
    """A hooked site's block with no norm attached: each CPU-runnable backend, training (every
    parameter gradient) and folded inference, against the reference backend."""
    torch.manual_seed(0)
    blk = afkern.FusedAdapterBlock(D, ["a", "b", "c"], adapter_config=placement, wrap_output=False).attach_norm(None)
    assert blk.site_norm() is None and not blk.spec().layer_norm
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    h, x, dout = (t.reshape(1, T, D) for t in _inputs(torch.float32))
    for name in _backends():
        judge_block(name, blk, h, x, dout, adapter_forward=True)


# ---------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("placement", ["mh_only", "both"])
def test_norm_free_site_with_and_without_its_block_matches_adapterhub(placement):
    """GPT-2 (pre-LN, inline residual adds): with adapters at the attention site only, the MLP
    site is hooked without a block and must compute AdapterHub's no-adapter output
    ``h + residual_input`` (sites.py ``LayerHooks.value``); with both sites, each has its block.
    float64 outputs and input gradients against AdapterHub to 1e-9."""
    adapters = pytest.importorskip("adapters")
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=97, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    hub = GPT2Model(cfg).eval()
    adapters.init(hub)
    ac = adapters.SeqBnConfig(mh_adapter=True, output_adapter=placement == "both", reduction_factor=8)
    for n in ("a", "b", "c"):
        hub.add_adapter(n, config=ac)
    hub.add_adapter_fusion(adapters.Fuse("a", "b", "c"))
    hub.set_active_adapters(adapters.Fuse("a", "b", "c"))
    with torch.no_grad():
        for n, p in hub.named_parameters():
            if "adapter" in n:
                p.add_(torch.randn_like(p) * 0.3)
    hub = hub.double()
    fused = afkern.from_adapterhub(hub)
    sites = sorted(k for k, _ in afkern.fused_blocks(fused))
    want = ["h.0.afkern_mh", "h.1.afkern_mh"] + (["h.0.afkern_output", "h.1.afkern_output"] if placement == "both" else [])
    assert sites == sorted(want)
    assert all(len(layer._afkern_hooks.sites) == 2 for layer in fused.h)  # the MLP site is hooked either way
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    res = {}
    for name, m in (("adapterhub", hub), ("afkern", fused)):
        e = m.wte(ids).detach().requires_grad_(True)
        y = m(inputs_embeds=e).last_hidden_state
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
        res[name] = (y.detach(), e.grad)
    assert_f64("last hidden state", res["afkern"][0], res["adapterhub"][0])
    assert_f64("input grad", res["afkern"][1], res["adapterhub"][1])
