"""The kernel limits have one Python source (afkern/ops/limits.py): the constants written in csrc/,
the registry's rules and the activation table must agree with it."""

import os
import re

import pytest
import torch

import afkern
from afkern import backends
from afkern.activations import ACTIVATIONS, canonical_activation
from afkern.ops import limits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def _const(src, name):
    m = re.search(rf"constexpr\s+int(?:64_t)?\s+{name}\s*=\s*(\d+)\s*;", src)
    assert m, f"{name} not found"
    return int(m.group(1))


def test_csrc_constants_match_limits():
    h = _read("csrc/launchers.h")
    assert _const(h, "kMaxAdapters") == limits.MAX_ADAPTERS
    assert _const(h, "kNumActs") == len(limits.KERNEL_ACTIVATIONS)
    assert _const(h, "kMaxLnWidth") == limits.MAX_LN_WIDTH
    # written once in C++ as well: no other file redefines them
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)
            if rel != os.path.join("csrc", "launchers.h"):
                src = _read(rel)
                for name in ("kMaxAdapters", "kNumActs", "kMaxLnWidth"):
                    assert not re.search(rf"constexpr\s+\w+\s+{name}\s*=", src), f"{rel} redefines {name}"


@pytest.mark.parametrize("path, decl", [("csrc/common.cuh", "enum Act : int"),
                                        ("csrc/cpu/folded_core.cpp", "enum Act : int64_t")])
def test_activation_codes_match_limits(path, decl):
    """The CUDA kernels' and the CPU core's activation codes are afkern.ops.limits'."""
    enum = re.search(re.escape(decl) + r" \{(.*?)\};", _read(path), re.S).group(1)
    codes = {m.group(1): int(m.group(2)) for m in re.finditer(r"k(\w+)\s*=\s*(\d+)", enum)}
    names = {"Linear": "linear", "Relu": "relu", "Gelu": "gelu", "GeluTanh": "gelu_tanh", "Silu": "silu",
             "Tanh": "tanh", "Sigmoid": "sigmoid", "LeakyRelu": "leakyrelu", "QuickGelu": "quick_gelu"}
    assert {names[k]: v for k, v in codes.items()} == limits.KERNEL_ACTIVATIONS


def test_kernel_activations_are_known_activations():
    assert set(limits.KERNEL_ACTIVATIONS) <= set(ACTIVATIONS)
    assert sorted(limits.KERNEL_ACTIVATIONS.values()) == list(range(len(limits.KERNEL_ACTIVATIONS)))
    assert afkern.KERNEL_ACTIVATIONS is limits.KERNEL_ACTIVATIONS


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_registry_reads_the_limits(name, monkeypatch):
    rec = backends.REGISTRY[name]
    assert rec.max_adapters == limits.MAX_ADAPTERS and rec.dtypes == limits.KERNEL_DTYPES
    assert rec.activations == frozenset(limits.KERNEL_ACTIVATIONS)
    monkeypatch.setattr(backends, "backend_status", lambda n, device="cpu": (True, "ok"))
    spec = lambda n, act="relu": afkern.FusedAdapterBlock(8, [f"a{i}" for i in range(n)],  # noqa: E731
                                                          afkern.AdapterConfig(non_linearity=act)).spec()
    assert backends.resolve_backend(name, "cuda", spec(limits.MAX_ADAPTERS), torch.bfloat16) == name
    with pytest.raises(ValueError, match=f"at most {limits.MAX_ADAPTERS} adapters"):
        backends.resolve_backend(name, "cuda", spec(limits.MAX_ADAPTERS + 1))
    with pytest.raises(ValueError, match="float32, bfloat16 and float16; got torch.float64"):
        backends.resolve_backend(name, "cuda", spec(2), torch.float64)
    with pytest.raises(ValueError, match="no kernel for activation 'mish'"):
        backends.resolve_backend(name, "cuda", spec(2, "mish"))
    assert canonical_activation("swish") in limits.KERNEL_ACTIVATIONS
