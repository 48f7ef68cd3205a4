"""One patched model called from several threads at once (a server, a DataLoader worker thread, a
Gradio demo): every output equals the same call made alone.

Nothing one forward writes may be read by another concurrent forward: the hook taps of hooked
sites live per thread (as AdapterHub's forward context), the caches (route plans, folded weights,
stacked segment weights) are built under a lock and keyed, and the recorded fusion weights are per
thread. Every family of the site table runs here (swap sites: BERT, DeBERTa; hooked sites: the
others), Pfeiffer and Houlsby placements, the active setup and ``afkern.route`` mixed in one run,
calls of different batch and sequence sizes interleaved, with non-trivial fusion weights.
"""

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import afkern

sys.path.insert(0, os.path.dirname(__file__))
import families as F  # noqa: E402
from test_families import PLACEMENTS, _perturb  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = list(F.ADAPTER_NAMES)
THREADS, CALLS = 4, 6
SHAPES = [(2, 7), (3, 5), (1, 9)]  # (batch, seq): calls of different sizes interleave


def _model(name, placement):
    spec = F.FAMILIES[name]
    model = F.make_plain(spec).double()
    afkern.patch_model(model, NAMES, PLACEMENTS[placement], "dynamic", backend="torch")
    afkern.add_fusion(model, "bc", ["c", "b"])
    return spec, _perturb(model, seed=3)


def _calls(spec, model):
    """(inputs, route or None) of every call: each shape with the active setup and routed."""
    fusions = afkern.routing.fusion_names(model)
    out = []
    for i, (b, s) in enumerate(SHAPES):
        x = F.cast_inputs(F.make_inputs(spec, batch=b, seq=s, pad_from=s - 2, dec_seq=s - 1,
                                        dec_pad_from=s - 3, seed=i), torch.float64)
        out.append((x, None))
        out.append((x, [fusions[(i + j) % len(fusions)] for j in range(b)]))
    return out


def _run(model, inputs, route):
    with torch.no_grad():
        if route is None:
            return model(**inputs)[0]
        with afkern.route(model, fusion=route):
            return model(**inputs)[0]


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("name", list(F.FAMILIES))
def test_concurrent_calls_equal_each_call_alone(name, placement):
    spec, model = _model(name, placement)
    calls = _calls(spec, model)
    alone = [_run(model, x, r) for x, r in calls]
    start = threading.Barrier(THREADS)

    def worker(t):
        start.wait()
        got = []
        for j in range(CALLS):
            k = (t + j * (t + 1)) % len(calls)  # each thread its own order
            try:
                got.append((k, _run(model, *calls[k])))
            except Exception as e:  # noqa: BLE001 - a raise is a failure reported with the others
                got.append((k, e))
        return got

    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for rs in pool.map(worker, range(THREADS)) for r in rs]
    wrong = []
    for k, out in results:
        if isinstance(out, Exception):
            wrong.append(f"call {k}: raised {type(out).__name__}: {out}")
        elif out.shape != alone[k].shape or not torch.allclose(out, alone[k], rtol=1e-12, atol=0):
            wrong.append(f"call {k}: differs from the call alone")
    assert not wrong, f"{len(wrong)} of {len(results)} concurrent calls wrong: {wrong[:4]}"
    # and alone again afterwards: nothing left behind by the concurrent calls
    for (x, r), want in zip(calls, alone):
        assert torch.allclose(_run(model, x, r), want, rtol=1e-12, atol=0)


def test_recorded_fusion_weights_are_per_thread():
    """``block.fusion_weights`` after a forward is that thread's forward's, whatever other threads ran."""
    spec, model = _model("gpt2", "pfeiffer")
    afkern.record_fusion_weights(model)
    block = next(b for _, b in afkern.fused_blocks(model))
    inputs = [F.cast_inputs(F.make_inputs(spec, batch=b, seq=s, pad_from=s - 1, seed=i), torch.float64)
              for i, (b, s) in enumerate(SHAPES)]
    want = []
    for x in inputs:
        _run(model, x, None)
        want.append(block.fusion_weights.clone())
    start = threading.Barrier(len(inputs))

    def worker(i):
        start.wait()
        ok = True
        for _ in range(CALLS):
            _run(model, inputs[i], None)
            w = block.fusion_weights
            ok = ok and w.shape == want[i].shape and torch.allclose(w, want[i], rtol=1e-12, atol=0)
        return ok

    with ThreadPoolExecutor(len(inputs)) as pool:
        assert all(pool.map(worker, range(len(inputs))))
