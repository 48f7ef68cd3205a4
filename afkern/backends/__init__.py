"""The one backend registry of afkern: every rule that picks a backend lives in this file.

=============  ==============================================================  ===============
name           what runs                                                       where
=============  ==============================================================  ===============
reference      naive per-adapter AdapterFusion (the oracle)                     any device
torch          re-associated layer in torch ops, folded at inference            any device
triton         Triton kernels (fused GEMM prologues/epilogues, row op, LN)      CUDA; CPU only
                                                                               under TRITON_INTERPRET=1
cuda           torch GEMMs (cuBLAS) + afkern's CUDA row-op / add-LN ops         CUDA, with the
                                                                               built extension
auto           the fastest measured backend that can run on the device         any device
=============  ==============================================================  ===============

Each backend is one :class:`Backend` record: whether it can run on a device and why not
(``status``), what it supports (dtypes, adapter count, activations; the kernel limits come from
``afkern.ops.limits``), and its layer function, with the common signature
``layer(h, input_tensor, P, spec, inv_temperature, score_scale, folded, prior, plan=None) -> (out,
probs)`` on 2-D inputs; ``plan`` (``afkern.ops.segments.SegmentPlan``) routes the tokens through
several fusions or adapters in one call, the plain forward being its one-segment case. Every backend takes the fusion controls and routing (they are inputs of the row op,
docs/DESIGN.md section 5).

A backend asked for by name that cannot run raises (RuntimeError: not on this device, with how to
get it; ValueError: not for this block or dtype, with what it supports); ``auto`` falls back
quietly, and :func:`resolve_backend` tells what it chose.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from ..ops.limits import KERNEL_ACTIVATIONS, KERNEL_DTYPES, MAX_ADAPTERS, MAX_LN_WIDTH
from . import reference, torch_ops

__all__ = ["Backend", "BACKENDS", "REGISTRY", "available_backends", "resolve_backend", "resolve_routed",
           "backend_status", "get_layer", "check_name", "AUTO_GPU_ORDER"]

BACKENDS = ("reference", "torch", "triton", "cuda", "auto")


@dataclass(frozen=True)
class Backend:
    """One backend: where it runs, what it supports, and its layer function."""

    name: str
    load: Callable[[], Any]  # the module holding ``status(device)`` and ``layer`` (kernels: imported on first use)
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  # None: any floating dtype
    max_adapters: Optional[int] = None
    activations: Optional[FrozenSet[str]] = None  # None: every activation afkern knows
    max_ln_width: Optional[int] = None  # widest LayerNorm its add + norm kernel takes (None: any)
    folds: bool = True  # uses folded weights at inference
    routes: bool = True  # its ``layer`` takes a segment plan of several fusions (or adapters) per batch

    def status(self, device: torch.device) -> Tuple[bool, str]:
        try:
            mod = self.load()
        except Exception as exc:  # pragma: no cover - depends on the install (no triton, ...)
            return False, f"its module could not be imported ({type(exc).__name__}: {exc})"
        return mod.status(device)

    @property
    def layer(self) -> Callable:
        return self.load().layer

    @property
    def bind(self) -> Optional[Callable]:
        """``bind(P, spec, plan, h) -> call or None``: the layer of a plan with its decisions made
        once, for activations like ``h`` (``afkern.ops.layer.FoldedCall``), where the backend has one."""
        return getattr(self.load(), "bind", None)

    def unsupported(self, spec=None, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """Why this backend cannot compute a block ``spec`` in ``dtype``, or None if it can."""
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            names = [str(d).replace("torch.", "") for d in self.dtypes]
            names = " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]
            return f"backend {self.name!r} computes in {names}; got {dtype}"
        if spec is None:
            return None
        if self.max_ln_width is not None and spec.layer_norm and spec.hidden > self.max_ln_width:
            return (f"backend {self.name!r} normalises rows of at most {self.max_ln_width} values in its add + "
                    f"LayerNorm kernel, this block's width is {spec.hidden}")
        if not spec.fusion:
            return None
        if self.max_adapters is not None and spec.n_adapters > self.max_adapters:
            return (f"backend {self.name!r} fuses at most {self.max_adapters} adapters per block, this block has "
                    f"{spec.n_adapters}")
        if self.activations is not None and spec.activation not in self.activations:
            return (f"backend {self.name!r} has no kernel for activation {spec.activation!r}; kernels support "
                    f"{sorted(self.activations)}")
        return None


def _lazy(module: str) -> Callable[[], Any]:
    return lambda: importlib.import_module(f"{__name__}.{module}")


_KERNELS = dict(dtypes=KERNEL_DTYPES, max_adapters=MAX_ADAPTERS, activations=frozenset(KERNEL_ACTIVATIONS))
REGISTRY: Dict[str, Backend] = {
    # imported here: plain torch, and torch.compile traces them without an import
    "reference": Backend("reference", lambda: reference, folds=False),
    "torch": Backend("torch", lambda: torch_ops),
    # imported on first use: they need triton, or register custom ops
    "triton": Backend("triton", _lazy("triton_ops"), **_KERNELS),
    "cuda": Backend("cuda", _lazy("cuda_ops"), max_ln_width=MAX_LN_WIDTH, **_KERNELS),
}

# The order in which ``auto`` tries backends on a CUDA device. The kernel backends enter it only
# once a GPU benchmark (afkern-bench on a GPU, committed under benchmarks/results/<gpu>/) shows
# they win there; until then ``auto`` keeps the cuBLAS-backed torch path, which needs no kernel
# that has not run on a GPU. AFKERN_AUTO_GPU="triton,cuda,torch" opts in earlier.
AUTO_GPU_ORDER = ("torch",)


def check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
    return name


def backend_status(name: str, device="cpu") -> Tuple[bool, str]:
    """(can_run, reason) for a backend name on a device."""
    name = check_name(name)
    if name == "auto":
        return True, "ok"
    return REGISTRY[name].status(torch.device(device))


def available_backends(device=None) -> List[str]:
    """Backend names that can run on ``device`` (default: CUDA if present, else CPU), ``auto`` last."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [n for n in BACKENDS if backend_status(n, device)[0]]


def _auto_gpu_order() -> Tuple[str, ...]:
    env = os.environ.get("AFKERN_AUTO_GPU")
    if not env:
        return AUTO_GPU_ORDER
    order = tuple(x.strip() for x in env.split(",") if x.strip())
    bad = [x for x in order if x not in ("torch", "triton", "cuda")]
    if bad:
        raise ValueError(f"AFKERN_AUTO_GPU lists unknown backends {bad}; expected names from torch, triton, cuda")
    return order


def resolve_backend(name: str, device, spec=None, dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend that ``name`` means for a block ``spec`` computing in ``dtype`` on ``device``.

    ``auto``: on CPU, torch (the re-associated path is the fastest there); on CUDA, the first
    backend of :data:`AUTO_GPU_ORDER` (or ``AFKERN_AUTO_GPU``) that can run there and supports the
    block and dtype, else torch. The reference path is never chosen automatically.
    """
    name = check_name(name)
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            for cand in _auto_gpu_order():
                if backend_status(cand, device)[0] and REGISTRY[cand].unsupported(spec, dtype) is None:
                    return cand
        return "torch"
    ok, why = backend_status(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} cannot run here: {why}")
    why = REGISTRY[name].unsupported(spec, dtype)
    if why is not None:
        raise ValueError(f"{why}; use backend='torch'")
    return name


def resolve_routed(name: str, device, spec=None, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that serves a routed forward (several fusions, or one adapter per sequence, in
    one batch): :func:`resolve_backend`, then a backend without routing raises when named and
    falls back to torch under ``auto``."""
    chosen = resolve_backend(name, device, spec, dtype)
    if not REGISTRY[chosen].routes:
        if name != "auto":
            raise ValueError(f"backend {chosen!r} cannot route several fusions in one batch; use backend='torch'")
        return "torch"
    return chosen


def get_layer(name: str) -> Callable:
    """The layer function of a concrete backend (see the module docstring for its signature)."""
    return REGISTRY[check_name(name)].layer
