"""The README's usage example runs as written."""

import os
import re

import pytest

from parity import assert_rounding_bound

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"<!-- test: run -->\n```python\n(.*?)```", text, flags=re.S)


def test_readme_has_runnable_examples():
    assert len(_blocks()) >= 1


def _run(i):
    ns = {"__name__": "__readme__"}
    exec(compile(_blocks()[i], f"README.md example {i}", "exec"), ns)
    return ns


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_example_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(i)


def test_readme_usage_example_does_what_it_says(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    ns = _run(0)
    model, hidden, weights = ns["model"], ns["hidden"], ns["weights"]
    assert hidden.shape == (2, 16, 384)
    assert sorted(weights) == [f"encoder.layer.{i}.output" for i in range(2)]
    for w in weights.values():
        assert w.shape == (3,)
        # 3 float32 means over the tokens (pairwise sums: at most ~32 roundings each) of rows summing to 1
        assert_rounding_bound("mean fusion weights", w.sum(), 1.0, terms=32 * 3, dtype=torch.float32)
    # the fusion-training step reached query, key and value of every block, and only them
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(any(k in n for k in (".query.", ".key.", ".value.")) for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "key.bias" not in n)
    assert any(isinstance(m, ns["afkern"].FusedAdapterBlock) for m in model.modules())
    assert torch.isfinite(hidden).all()
