"""The Triton fused core serves routed batches at inference (issue 18, item 1): each segment's
folded maps are read in place from the stack of folds (``CoreWeights.seg``), a token tile that
straddles a segment boundary loops over its segments (kernels/fusion_core.py).

Judged by the 2x rule (tests/parity.py) against a float64 truth from the torch backend, with the
torch backend's own float32 / bfloat16 run as the baseline; routes whose segments start inside a
tile and span several tiles, fusions that are not consecutive in the block's stack (negative and
skipped offsets), structural flags (``residual_before``, ``query_before_ln``, a subset of the
adapters, a static fusion), tokens in batch order and interleaved (a permuted plan).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("triton")

import afkern  # noqa: E402
from afkern.compiler import block_params, routed_spec, segments  # noqa: E402
from afkern.ops.segments import SegmentPlan, route_plan  # noqa: E402
from conftest import perturb_  # noqa: E402
from parity import assert_2x  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# the triton runs: CPU tensors under the interpreter, CUDA tensors on the GPU day (scripts/gpu_tests.txt)
KDEV = "cuda" if os.environ.get("AFKERN_TEST_GPU") == "1" and torch.cuda.is_available() else "cpu"

ADAPTERS = ["a", "b", "c", "d"]
FUSIONS = {
    "tri": (["b", "c", "d"], afkern.FusionConfig.dynamic()),
    "sub": (["c", "a"], afkern.FusionConfig.static()),
    "rb": (["b", "d", "a"], afkern.FusionConfig.dynamic(residual_before=True)),
    "all": (ADAPTERS, afkern.FusionConfig.dynamic()),
    "qbl": (["a", "d"], afkern.FusionConfig.dynamic(query_before_ln=True)),
}
# (per-token route, label): segment sizes 5 / 17 / 1 / 17 over the interpreter's 16-token tiles
ROUTES = {
    "grouped": ["qbl"] * 5 + ["tri"] * 17 + ["rb"] * 1 + ["sub"] * 17,
    "interleaved": [("all", "sub", "qbl")[i % 3] for i in range(29)],
    "one_fusion_late_in_stack": ["qbl"] * 21,
}


def _block():
    torch.manual_seed(0)
    b = afkern.FusedAdapterBlock(24, ADAPTERS, afkern.AdapterConfig(reduction_factor=4), in_features=36,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 dtype=torch.float64, backend="torch").eval()
    for name, (names, fc) in FUSIONS.items():
        b.add_fusion(name, names, fc)
    perturb_(b, 0.3, seed=0)
    with torch.no_grad():
        b.LayerNorm.weight.add_(torch.randn(24, dtype=torch.float64) * 0.1)
        b.LayerNorm.bias.add_(torch.randn(24, dtype=torch.float64) * 0.1)
    return b


def _run(block, route, dtype, layer, device="cpu"):
    g = torch.Generator().manual_seed(5)
    T = len(route)
    h = torch.randn(T, 24, generator=g, dtype=torch.float64).to(device, dtype)
    x = torch.randn(T, 24, generator=g, dtype=torch.float64).to(device, dtype)
    block = block.to(device)
    names = list(block.fusions)
    plan = route_plan([names.index(r) for r in route], names, 1, device)
    with torch.no_grad():
        segs = segments(block, plan, device, True)
        out, p = layer(h, x, block_params(block), routed_spec(block, block.fusions[plan.names[0]]),
                       plan=SegmentPlan(plan, segs))
    return out.cpu(), p.cpu()


@pytest.fixture
def seg_launches(monkeypatch):
    """Counts the scores kernel's launches with per-segment maps."""
    import afkern.kernels.fusion_core as fc

    seen = []
    orig = fc._launch_scores

    def spy(*a, **k):
        seen.append(k.get("seg") is not None)
        return orig(*a, **k)

    monkeypatch.setattr(fc, "_launch_scores", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_routed_folded_batch_runs_the_fused_core(route, dtype, seg_launches):
    from afkern.backends import torch_ops, triton_ops

    b64 = _block()
    truth = _run(b64, ROUTES[route], torch.float64, torch_ops.layer)
    low = copy.deepcopy(b64).to(dtype)
    base = _run(low, ROUTES[route], dtype, torch_ops.layer)
    got = _run(copy.deepcopy(low), ROUTES[route], dtype, triton_ops.layer, KDEV)
    assert seg_launches == [True], f"the routed folded batch did not run the segmented fused core: {seg_launches}"
    assert_2x(f"{route} out", got[0], base[0], truth[0], dtype)
    assert_2x(f"{route} probs", got[1], base[1], truth[1], torch.float32)
