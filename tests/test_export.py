"""torch.compile and ONNX export of patched models (torch path), compared with eager.

ONNX export is AdapterHub's open issue #224; afkern's blocks are plain torch ops on the torch
path, so the dynamo-based exporter (torch.onnx.export(..., dynamo=True), needs onnxscript) traces
them with dynamic batch and sequence sizes.
"""

import copy

import pytest
import torch

import afkern
from conftest import perturb_
from parity import assert_2x_all, f64_step, f64_truth, judge


def _model(layers=1, adapter_config="houlsby"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=40, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=72,
                     vocab_size=97, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    m = BertModel(cfg).eval()
    afkern.patch_bert(m, ["a", "b", "c"], adapter_config, "dynamic", backend="torch")
    return perturb_(m, 0.3)


def _inputs(b=2, s=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - 3:] = 0
    return ids, mask


class _Wrap(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids, mask):
        return self.m(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    m = _model()
    ids, mask = _inputs()
    cm = torch.compile(copy.deepcopy(m), backend=backend, fullgraph=True)
    inputs = dict(input_ids=ids, attention_mask=mask)
    # the baseline: afkern's reference backend in float32 (eager afkern shares the compiled code);
    # eager (folded weights) and compiled are both judged
    base32, truth64 = f64_truth(m, inputs, dtype=torch.float32), f64_truth(m, inputs)
    with torch.no_grad():
        judge("eager inference", m(**inputs).last_hidden_state, base32, truth64)
        judge("compiled inference", cm(**inputs).last_hidden_state, base32, truth64)
    # training step (fusion trainable): outputs and every gradient, against a float64 copy's step
    t, truth = f64_step(m, inputs)
    base_out, base = f64_step(m, inputs, dtype=torch.float32)
    out = cm(**inputs).last_hidden_state
    out.pow(2).mean().backward()
    m(**inputs).last_hidden_state.pow(2).mean().backward()  # eager: which parameters get a gradient
    judge("compiled training forward", out, base_out, t)
    grads = dict(cm.named_parameters())
    judged = {}
    for name, p in m.named_parameters():
        q = grads["_orig_mod." + name] if "_orig_mod." + name in grads else grads[name]
        if p.grad is None:
            assert q.grad is None or q.grad.abs().max() == 0, name
            continue
        judged[name] = (q.grad, base[name], truth[name])
    assert len(judged) > 20
    assert_2x_all("compiled gradients", judged)


def test_compile_with_adapter_control():
    torch._dynamo.reset()
    m = _model()
    ids, mask = _inputs()
    afkern.zero_adapters(m, "b")
    with torch.no_grad():
        inputs = dict(input_ids=ids, attention_mask=mask)
        want, truth = f64_truth(m, inputs, dtype=torch.float32), f64_truth(m, inputs)
        judge("eager, an adapter zeroed", m(**inputs).last_hidden_state, want, truth)
        got = torch.compile(m, backend="eager", fullgraph=True)(**inputs).last_hidden_state
    judge("compiled, an adapter zeroed", got, want, truth)


@pytest.mark.slow
def test_inductor_block_matches_eager():
    """One real inductor compile (about 30 s on 2 CPU cores for a block; a whole BERT takes ~90 s)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    b = perturb_(afkern.FusedAdapterBlock(40, ["a", "b", "c"], in_features=72, backend="torch").eval(), 0.3)
    h, x = torch.randn(3, 7, 72), torch.randn(3, 7, 40)
    with torch.no_grad():
        got = torch.compile(b, backend="inductor", fullgraph=True)(h, x)
    judge("inductor", got, f64_truth(b, (h, x), dtype=torch.float32), f64_truth(b, (h, x)))


def test_onnx_export_dynamo_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    w = _Wrap(_model(layers=2)).eval()
    ids, mask = _inputs()
    path = str(tmp_path / "afkern_bert.onnx")
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    with torch.no_grad():
        torch.onnx.export(w, (ids, mask), path, input_names=["ids", "mask"], output_names=["hidden"],
                          dynamo=True, dynamic_shapes=(dims, dims))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b, s, seed in ((2, 9, 0), (3, 13, 1), (1, 5, 2)):  # other shapes than the traced one
        ids, mask = _inputs(b, s, seed)
        got = torch.from_numpy(sess.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0])
        judge(f"onnxruntime [{b}, {s}]", got, f64_truth(w, (ids, mask), dtype=torch.float32), f64_truth(w, (ids, mask)))


def test_onnx_export_legacy_torchscript_matches_onnxruntime(tmp_path):
    """The TorchScript-based exporter (dynamo=False) too: the block's extra state (the fusion
    temperature) is a tensor, which that exporter can carry."""
    ort = pytest.importorskip("onnxruntime")
    w = _Wrap(_model(layers=2)).eval()
    ids, mask = _inputs()
    path = str(tmp_path / "afkern_bert_ts.onnx")
    with torch.no_grad():
        torch.onnx.export(w, (ids, mask), path, input_names=["ids", "mask"], output_names=["hidden"], dynamo=False,
                          dynamic_axes={"ids": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}})
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b, s, seed in ((2, 9, 0), (3, 13, 1)):
        ids, mask = _inputs(b, s, seed)
        got = torch.from_numpy(sess.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0])
        judge(f"onnxruntime [{b}, {s}]", got, f64_truth(w, (ids, mask), dtype=torch.float32), f64_truth(w, (ids, mask)))
