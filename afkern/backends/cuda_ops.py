"""Backend ``cuda``: custom ops ``torch.ops.afkern.*`` and the layer function on top of them.

Three layers, as in flash-attention's Python face:

1. Raw custom ops in the ``afkern`` namespace, defined here with ``torch.library`` so their
   schemas, fake (meta) implementations, autograd formulas and a CPU reference implementation
   exist whether or not the compiled extension does:

   ==========================  ====================================================================
   op                          schema
   ==========================  ====================================================================
   ``rowop_fwd``               (Tensor Z, Tensor A, Tensor? sb, Tensor? score_scale, Tensor? prior,
                               int n_adapters, int activation, float inv_temperature)
                               -> (Tensor Y, Tensor p)
   ``rowop_bwd``               (Tensor dY, Tensor? dp, Tensor Z, Tensor A, Tensor p,
                               Tensor? score_scale, int n_adapters, int activation,
                               float inv_temperature) -> (Tensor dZ, Tensor dA, Tensor dsb)
   ``add_layernorm_fwd``       (Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps)
                               -> (Tensor out, Tensor mean, Tensor rstd)
   ``add_layernorm_bwd``       (Tensor dout, Tensor x, Tensor residual, Tensor weight, Tensor mean,
                               Tensor rstd) -> (Tensor dx, Tensor dweight, Tensor dbias)
   ==========================  ====================================================================

   The compiled extension ``afkern._C`` (csrc/) adds only their CUDA kernels
   (``TORCH_LIBRARY_IMPL(afkern, CUDA, m)``). The CPU kernels are the plain-torch contract
   (:mod:`afkern.ops.rowop`, ATen's LayerNorm in float32), so ``opcheck`` and gradient tests of
   the ops run on any machine, and the same tests run the CUDA kernels where a GPU is present.
2. Differentiable wrappers :func:`rowop` and :func:`add_layer_norm` (autograd registered on
   the forward ops with ``torch.library.register_autograd``).
3. :func:`layer`: the re-associated layer (``afkern.ops.layer``, cuBLAS GEMMs through torch) with
   these ops as its row op and residual-add LayerNorm.

The extension is optional at build and at import: importing afkern never fails because of it;
only asking for backend ``"cuda"`` reports why it is missing. With ``AFKERN_JIT_BUILD=1`` a
missing extension is compiled at first use from a source checkout
(``torch.utils.cpp_extension.load`` with the sources and flags of ``csrc_build.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import jit
from ..ops.activations import activation_code
from ..ops.layer import Primitives, folded_call, fusion_layer
from ..ops.limits import KERNEL_ACTIVATIONS, MAX_ADAPTERS
from ..ops.rowop import rowop_backward, rowop_forward

__all__ = ["extension_status", "status", "rowop", "add_layer_norm", "PRIMITIVES", "layer", "bind"]

_CODE_TO_NAME = {code: name for name, code in KERNEL_ACTIVATIONS.items()}

# ---------------------------------------------------------------------------------------------
# 1. schemas, fakes, CPU reference kernels, autograd
# ---------------------------------------------------------------------------------------------

_lib = torch.library.Library("afkern", "FRAGMENT")
_lib.define(
    "rowop_fwd(Tensor Z, Tensor A, Tensor? sb, Tensor? score_scale, Tensor? prior, int n_adapters, int activation, "
    "float inv_temperature) -> (Tensor, Tensor)"
)
_lib.define(
    "rowop_bwd(Tensor dY, Tensor? dp, Tensor Z, Tensor A, Tensor p, Tensor? score_scale, int n_adapters, "
    "int activation, float inv_temperature) -> (Tensor, Tensor, Tensor)"
)
_lib.define("add_layernorm_fwd(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)")
_lib.define(
    "add_layernorm_bwd(Tensor dout, Tensor x, Tensor residual, Tensor weight, Tensor mean, Tensor rstd) "
    "-> (Tensor, Tensor, Tensor)"
)


def _expect(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def _check_2d(t, name, op, shape, dtype=None):
    _expect(t.dim() == 2 and tuple(t.shape) == tuple(shape), f"{op}: expected {name} of shape {list(shape)}, got {list(t.shape)}")
    if dtype is not None:
        _expect(t.dtype == dtype, f"{op}: expected {name} of dtype {dtype}, got {t.dtype}")


def _check_rowop(op, Z, A, sb, score_scale, n_adapters, activation, prior=None):
    _expect(Z.dim() == 2, f"{op}: expected Z of shape [T, N*r], got {list(Z.shape)}")
    _expect(Z.dtype.is_floating_point, f"{op}: expected a floating-point Z, got {Z.dtype}")
    _expect(1 <= n_adapters <= MAX_ADAPTERS, f"{op}: expected 1 <= n_adapters <= {MAX_ADAPTERS}, got {n_adapters}")
    _expect(Z.shape[1] > 0 and Z.shape[1] % n_adapters == 0,
            f"{op}: expected Z's width {Z.shape[1]} to be a positive multiple of n_adapters = {n_adapters}")
    _expect(activation in _CODE_TO_NAME, f"{op}: expected an activation code in {sorted(_CODE_TO_NAME)} "
            f"(afkern.activations.KERNEL_ACTIVATIONS), got {activation}")
    T = Z.shape[0]
    _check_2d(A, "A", op, Z.shape, Z.dtype)
    if sb is not None:
        _check_2d(sb, "sb", op, (T, n_adapters), Z.dtype)
    if score_scale is not None:
        _check_2d(score_scale, "score_scale", op, (T, n_adapters), torch.float32)
    if prior is not None:
        _check_2d(prior, "prior", op, (T, n_adapters), torch.float32)
    return T


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The row op's p and score gradients: float32, or float64 for float64 inputs (the CPU
    reference kernels only; the CUDA kernels take 16/32-bit inputs), as ``afkern.ops.rowop.acc``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """LayerNorm statistics: float32, or float64 for float64 inputs (CPU reference only)."""
    return torch.promote_types(dtype, torch.float32)


def _check_ln(op, x, residual, weight, bias=None):
    _expect(x.dim() == 2 and x.shape[1] > 0, f"{op}: expected x of shape [T, d] with d > 0, got {list(x.shape)}")
    _expect(x.dtype.is_floating_point, f"{op}: expected a floating-point x, got {x.dtype}")
    _check_2d(residual, "residual", op, x.shape, x.dtype)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _expect(t.dim() == 1 and t.shape[0] == x.shape[1], f"{op}: expected {name} of shape [{x.shape[1]}], got {list(t.shape)}")
        _expect(t.dtype == x.dtype, f"{op}: expected {name} of x's dtype {x.dtype}, got {t.dtype}")


@torch.library.register_fake("afkern::rowop_fwd")
def _rowop_fwd_fake(Z, A, sb, score_scale, prior, n_adapters, activation, inv_temperature):
    T = _check_rowop("afkern::rowop_fwd", Z, A, sb, score_scale, n_adapters, activation, prior)
    return Z.new_empty(Z.shape), Z.new_empty((T, n_adapters), dtype=_acc_dtype(Z.dtype))


@torch.library.register_fake("afkern::rowop_bwd")
def _rowop_bwd_fake(dY, dp, Z, A, p, score_scale, n_adapters, activation, inv_temperature):
    op = "afkern::rowop_bwd"
    T = _check_rowop(op, Z, A, None, score_scale, n_adapters, activation)
    _check_2d(dY, "dY", op, Z.shape, Z.dtype)
    _check_2d(p, "p", op, (T, n_adapters), _acc_dtype(Z.dtype))
    if dp is not None:
        _check_2d(dp, "dp", op, (T, n_adapters), _acc_dtype(Z.dtype))
    return Z.new_empty(Z.shape), A.new_empty(Z.shape), Z.new_empty((T, n_adapters), dtype=_acc_dtype(Z.dtype))


@torch.library.register_fake("afkern::add_layernorm_fwd")
def _add_ln_fwd_fake(x, residual, weight, bias, eps):
    _check_ln("afkern::add_layernorm_fwd", x, residual, weight, bias)
    sd = _stat_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=sd), x.new_empty((x.shape[0],), dtype=sd)


@torch.library.register_fake("afkern::add_layernorm_bwd")
def _add_ln_bwd_fake(dout, x, residual, weight, mean, rstd):
    op = "afkern::add_layernorm_bwd"
    _check_ln(op, x, residual, weight)
    _check_2d(dout, "dout", op, x.shape, x.dtype)
    for name, t in (("mean", mean), ("rstd", rstd)):
        _expect(t.dim() == 1 and t.shape[0] == x.shape[0], f"{op}: expected {name} of shape [{x.shape[0]}], got {list(t.shape)}")
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


# CPU kernels: the plain-torch contract. They make the ops callable (and opcheck-able) on CPU;
# they are not a fast path (backend "torch" is the CPU path).
def _rowop_fwd_cpu(Z, A, sb, score_scale, prior, n_adapters, activation, inv_temperature):
    _check_rowop("afkern::rowop_fwd", Z, A, sb, score_scale, n_adapters, activation, prior)
    Y, p = rowop_forward(Z, A, sb, n_adapters, _CODE_TO_NAME[activation], inv_temperature, score_scale, prior)
    return Y.contiguous(), p.contiguous()


def _rowop_bwd_cpu(dY, dp, Z, A, p, score_scale, n_adapters, activation, inv_temperature):
    _rowop_bwd_fake(dY, dp, Z, A, p, score_scale, n_adapters, activation, inv_temperature)  # checks only
    dZ, dA, dsb = rowop_backward(dY, dp, Z, A, p, n_adapters, _CODE_TO_NAME[activation], inv_temperature, score_scale)
    return dZ.contiguous(), dA.contiguous(), dsb.contiguous()


def _add_ln_fwd_cpu(x, residual, weight, bias, eps):
    _check_ln("afkern::add_layernorm_fwd", x, residual, weight, bias)
    acc = _stat_dtype(x.dtype)
    out, mean, rstd = torch.native_layer_norm(x.to(acc) + residual.to(acc), [x.shape[1]], weight.to(acc),
                                              bias.to(acc), eps)
    return out.to(x.dtype), mean.reshape(-1), rstd.reshape(-1)


def _add_ln_bwd_cpu(dout, x, residual, weight, mean, rstd):
    _add_ln_bwd_fake(dout, x, residual, weight, mean, rstd)  # checks only
    acc = _stat_dtype(x.dtype)
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dout.to(acc), x.to(acc) + residual.to(acc), [x.shape[1]], mean.to(acc).reshape(-1, 1),
        rstd.to(acc).reshape(-1, 1), weight.to(acc), torch.zeros_like(weight, dtype=acc), [True, True, True])
    return dx.to(x.dtype), dw.to(weight.dtype), db.to(weight.dtype)


_lib.impl("rowop_fwd", _rowop_fwd_cpu, "CPU")
_lib.impl("rowop_bwd", _rowop_bwd_cpu, "CPU")
_lib.impl("add_layernorm_fwd", _add_ln_fwd_cpu, "CPU")
_lib.impl("add_layernorm_bwd", _add_ln_bwd_cpu, "CPU")


def _rowmajor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels take any row stride but need a unit stride along the row."""
    if t is None or t.dim() != 2 or t.stride(1) == 1 or t.shape[1] <= 1:
        return t
    return t.contiguous()


def _rowop_setup(ctx, inputs, output):
    Z, A, sb, score_scale, prior, n_adapters, activation, inv_temperature = inputs
    ctx.save_for_backward(Z, A, output[1], score_scale)
    ctx.args = (n_adapters, activation, inv_temperature)
    ctx.sb_dtype = None if sb is None else sb.dtype


def _rowop_bwd_autograd(ctx, dY, dp):
    Z, A, p, score_scale = ctx.saved_tensors
    n_adapters, activation, inv_temperature = ctx.args
    dY = torch.zeros_like(Z) if dY is None else _rowmajor(dY.to(Z.dtype))
    dp = None if dp is None else _rowmajor(dp.to(_acc_dtype(Z.dtype)))
    dZ, dA, dsb = torch.ops.afkern.rowop_bwd(dY, dp, Z, A, p, score_scale, n_adapters, activation, inv_temperature)
    dsb = None if ctx.sb_dtype is None else dsb.to(ctx.sb_dtype)
    return dZ, dA, dsb, None, None, None, None, None


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _add_ln_bwd_autograd(ctx, dout, dmean, drstd):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.afkern.add_layernorm_bwd(dout.to(x.dtype).contiguous(), x, residual, weight, mean, rstd)
    return dx, dx, dw, db, None


torch.library.register_autograd("afkern::rowop_fwd", _rowop_bwd_autograd, setup_context=_rowop_setup)
torch.library.register_autograd("afkern::add_layernorm_fwd", _add_ln_bwd_autograd, setup_context=_add_ln_setup)

# ---------------------------------------------------------------------------------------------
# 2. differentiable wrappers
# ---------------------------------------------------------------------------------------------


def rowop(Z: torch.Tensor, A: torch.Tensor, sb: Optional[torch.Tensor], n_adapters: int, activation: str,
          inv_temperature: float = 1.0, score_scale: Optional[torch.Tensor] = None,
          prior: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fusion row op through ``torch.ops.afkern.rowop_fwd`` (differentiable).

    Z, A: [T, N*r] (same float dtype; any row stride, unit stride along the row); sb: [T, N] or
    None; score_scale: [T, N] score-dropout scale or None; prior: [N] or [T, N] or None (an [N]
    prior is passed as a row-stride-0 view, not copied); activation: a name of
    ``KERNEL_ACTIVATIONS``. Returns Y [T, N*r] in Z's dtype and p [T, N] float32, exactly
    :func:`afkern.ops.rowop.rowop_forward`; the backward is :func:`rowop_backward`'s formula.
    """
    code = activation_code(activation)
    T = Z.shape[0]
    if sb is not None and sb.dtype != Z.dtype:
        sb = sb.to(Z.dtype)
    if score_scale is not None:
        score_scale = score_scale.to(device=Z.device, dtype=torch.float32)
    if prior is not None:
        prior = prior.to(device=Z.device, dtype=torch.float32)
        prior = prior.expand(T, n_adapters) if prior.dim() == 1 else _rowmajor(prior)
    return torch.ops.afkern.rowop_fwd(
        _rowmajor(Z), _rowmajor(A.to(Z.dtype)), _rowmajor(sb), _rowmajor(score_scale), prior,
        int(n_adapters), code, float(inv_temperature),
    )


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """``F.layer_norm(x + residual, (d,), weight, bias, eps)`` through ``afkern::add_layernorm_fwd``.

    x, residual: [..., d] (residual None: a LayerNorm of x alone); weight, bias: [d] or None (then
    1 and 0). The sum is never rounded before the normalisation (float32 statistics). The op takes
    one dtype: x and residual of different dtypes (autocast: a 16-bit sub-layer output and the
    float32 residual stream) run in their promoted dtype, which is the output's, as ``x + residual``
    in torch (the residual stream is not rounded to 16 bits).
    """
    d = x.shape[-1]
    shape = x.shape
    if residual is None:
        residual = torch.zeros_like(x)
    elif residual.dtype != x.dtype:
        x = x.to(torch.promote_types(x.dtype, residual.dtype))
    if weight is None:
        weight = torch.ones(d, dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(d, dtype=x.dtype, device=x.device)
    out, _, _ = torch.ops.afkern.add_layernorm_fwd(
        x.reshape(-1, d).contiguous(), residual.to(x.dtype).reshape(-1, d).contiguous(),
        weight.to(x.dtype).contiguous(), bias.to(x.dtype).contiguous(), float(eps),
    )
    return out.view(shape)


# ---------------------------------------------------------------------------------------------
# 3. the extension and the layer function
# ---------------------------------------------------------------------------------------------

_EXT = None
_ERR = "not tried"


def _jit_build():
    """Compile csrc/ with torch.utils.cpp_extension.load (AFKERN_JIT_BUILD=1) and load it."""
    jit.load("afkern_C", is_python_module=False, **jit.csrc_build().jit_load_kwargs(jit.repo_root()))
    return "afkern_C (JIT build)"


def _load():
    global _EXT, _ERR
    if _EXT is not None or _ERR != "not tried":
        return _EXT
    try:
        from .. import _C  # type: ignore[attr-defined]  # noqa: F401  (registers the CUDA kernels)

        _EXT, _ERR = jit.own_build(_C), ""
        return _EXT
    except Exception as exc:
        err = f"{exc}"
    if jit.enabled():
        try:
            _EXT, _ERR = _jit_build(), ""
            return _EXT
        except Exception as exc:
            err += f"; the JIT build (AFKERN_JIT_BUILD=1) failed: {exc}"
    _ERR = (
        f"the CUDA extension afkern._C is not built ({err}); reinstall with a CUDA toolkit and a CUDA "
        "build of torch present (AFKERN_FORCE_CUDA_BUILD=1 pip install --no-build-isolation .), or set "
        "AFKERN_JIT_BUILD=1 to compile it at first use from a source checkout"
    )
    return None


def extension_status() -> Tuple[bool, str]:
    """(built and loaded, reason). Tries to load the extension once."""
    ext = _load()
    return (ext is not None), ("ok" if ext is not None else _ERR)


def status(device: torch.device) -> Tuple[bool, str]:
    if device.type != "cuda":
        return False, (
            f"the cuda backend runs on CUDA tensors; these are on {device.type} (it needs a CUDA GPU and the "
            "extension built at install: AFKERN_FORCE_CUDA_BUILD=1 pip install --no-build-isolation .)"
        )
    return extension_status()


#: The cuda backend's primitives: afkern's custom ops, on any device that has kernels for them
#: (CUDA with the extension; CPU through the reference kernels, for tests).
PRIMITIVES = Primitives(rowop=rowop, add_norm=add_layer_norm, uniform_dtype=True)


def layer(h, input_tensor, P, spec, inv_temperature=1.0, score_scale=None, folded=None, prior=None, plan=None):
    """h, input_tensor [T, d] on CUDA, float32 / bfloat16 / float16: the layer of
    ``afkern.ops.layer`` with the row op and the residual-add LayerNorms on afkern's CUDA kernels
    (GEMMs, the segmented ones of a routed batch included, stay on cuBLAS). Returns (out [T, d],
    probs [T, N] float32 or None)."""
    _ready(h)
    return fusion_layer(h, input_tensor, P, spec, PRIMITIVES, inv_temperature, score_scale, folded, prior, plan)


def bind(P, spec, plan, h):
    """``layer`` of ``plan`` with its decisions made, for activations like ``h`` (their device is
    part of the compile key, so its checks run here once), or None (not one folded fusion)."""
    _ready(h)
    return folded_call(P, spec, PRIMITIVES, plan, h.dtype)


def _ready(h):
    ok, why = extension_status()
    if not ok:
        raise RuntimeError(f"backend 'cuda' cannot run: {why}")
    if h.device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' runs on CUDA tensors; got tensors on {h.device.type}")
