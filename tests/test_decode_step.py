"""A decode step of a patched model makes no host synchronisation and takes no data-dependent
Python branch in afkern's code (docs/DESIGN.md section 7; issue 18, item 3).

On a GPU, decoding at batch 1 is launch-bound and the step must be capturable in a CUDA graph;
what makes a step uncapturable is a read of a tensor's value on the host: ``.item()``,
``.tolist()``, ``bool(t)`` / ``if t:`` (a data-dependent branch), ``int(t)``, ``nonzero``,
``.cpu()``. On this CPU every such call is intercepted with a ``TorchFunctionMode`` and counted
when afkern's code (``afkern/``, ``kernels/``) is on the stack: greedy decoding with the KV cache,
the active fusion and ``afkern.route``, Pfeiffer and Houlsby placements, after the first step
(the first step of a batch shape builds and caches its plan).
"""

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import afkern

sys.path.insert(0, os.path.dirname(__file__))
import families as F  # noqa: E402
from test_families import PLACEMENTS, _perturb  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = (os.path.join(ROOT, "afkern") + os.sep, os.path.join(ROOT, "kernels") + os.sep)
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values made while afkern's code is on the stack."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            f = sys._getframe(1)
            while f is not None:
                if f.f_code.co_filename.startswith(OURS):
                    self.seen.append(f"{name} in {os.path.relpath(f.f_code.co_filename, ROOT)}:{f.f_lineno}")
                    break
                f = f.f_back
        return func(*args, **(kwargs or {}))


def _lm(placement):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=F.VOCAB, n_positions=64, n_embd=F.HIDDEN, n_layer=2, n_head=F.HEADS,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(cfg).eval()
    afkern.patch_model(lm, list(F.ADAPTER_NAMES), PLACEMENTS[placement], "dynamic", backend="torch")
    afkern.add_fusion(lm, "bc", ["c", "b"])
    return _perturb(lm)


def _steps(lm, ids, n=3):
    """Prefill, then ``n`` greedy steps with the KV cache; returns the host reads of the last step."""
    with torch.no_grad():
        out = lm(ids, use_cache=True)
        for k in range(n):
            nxt = out.logits[:, -1:].argmax(-1)
            if k == n - 1:
                with HostReads() as reads:
                    out = lm(nxt, past_key_values=out.past_key_values, use_cache=True)
                return reads.seen
            out = lm(nxt, past_key_values=out.past_key_values, use_cache=True)


def test_host_reads_are_seen():
    """The counter sees a host read made in afkern's code (so the test below can fail)."""
    ns = {}
    exec(compile("def probe(t):\n    return t.sum().item()\n", os.path.join(ROOT, "afkern", "probe.py"), "exec"), ns)
    with HostReads() as reads:
        ns["probe"](torch.ones(3))
        torch.ones(3).sum().item()  # outside afkern: not counted
    assert len(reads.seen) == 1 and reads.seen[0].startswith("item in afkern")


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("routed", [False, True])
def test_decode_step_has_no_host_sync(placement, routed):
    lm = _lm(placement)
    ids = torch.randint(F.FIRST_ID, F.VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    if routed:
        with afkern.route(lm, fusion=["bc", "a,b,c", "bc"]):
            seen = _steps(lm, ids)
    else:
        seen = _steps(lm, ids)
    assert not seen, f"host reads in a decode step: {seen[:5]}"
