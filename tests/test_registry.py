"""The backend registry is the one list of backend names and kernel limits (docs/DESIGN.md section 5):
the bench providers and the ``afkern-train --backend`` choices come from it, and its records carry
every limit the kernels check, LayerNorm width included, so ``auto`` never picks a backend that
would then fail inside a C++ check."""

import dataclasses

import pytest

import afkern
from afkern.backends import BACKENDS, REGISTRY, resolve_backend
from afkern.ops.limits import MAX_ADAPTERS, MAX_LN_WIDTH


def _spec(hidden, layer_norm=True, n=3, fusion=True):
    b = afkern.FusedAdapterBlock(24, ["a", "b", "c"])
    return dataclasses.replace(b.spec(), hidden=hidden, layer_norm=layer_norm, n_adapters=n, fusion=fusion)


def test_names_come_from_the_registry():
    from afkern.bench.providers import AFKERN_BACKENDS
    from afkern.train.cli import build_parser

    assert AFKERN_BACKENDS == tuple(REGISTRY) and set(BACKENDS) == set(REGISTRY) | {"auto"}
    p = build_parser()
    sub = next(a for a in p._actions if a.dest and a.choices and "fusion" in a.choices)
    backend = next(a for a in sub.choices["fusion"]._actions if a.dest == "backend")
    assert sorted(backend.choices) == sorted(BACKENDS)


@pytest.mark.parametrize("fusion", [True, False])
def test_layernorm_width_is_a_record_limit(fusion):
    cuda = REGISTRY["cuda"]
    assert cuda.max_ln_width == MAX_LN_WIDTH and cuda.max_adapters == MAX_ADAPTERS
    wide = _spec(MAX_LN_WIDTH + 1, fusion=fusion)
    assert "LayerNorm" in cuda.unsupported(wide) and str(MAX_LN_WIDTH) in cuda.unsupported(wide)
    assert cuda.unsupported(_spec(MAX_LN_WIDTH, fusion=fusion)) is None
    assert cuda.unsupported(_spec(MAX_LN_WIDTH + 1, layer_norm=False, fusion=fusion)) is None  # a norm-free site
    assert REGISTRY["torch"].unsupported(wide) is None


def test_auto_skips_a_backend_the_block_exceeds(monkeypatch):
    """On CUDA, ``auto`` passes over a kernel backend whose record the block exceeds (LayerNorm
    width, adapter count) instead of picking it and failing in the kernel."""
    import torch

    import afkern.backends as B

    monkeypatch.setattr(B, "_auto_gpu_order", lambda: ("cuda", "torch"))
    monkeypatch.setattr(B, "backend_status", lambda name, device="cpu": (True, "ok"))
    dev = torch.device("cuda")
    assert resolve_backend("auto", dev, _spec(64)) == "cuda"
    assert resolve_backend("auto", dev, _spec(MAX_LN_WIDTH + 1)) == "torch"
    assert resolve_backend("auto", dev, _spec(64, n=MAX_ADAPTERS + 1)) == "torch"
    with pytest.raises(ValueError, match="LayerNorm kernel"):  # asked for by name: it says why
        resolve_backend("cuda", dev, _spec(MAX_LN_WIDTH + 1))
