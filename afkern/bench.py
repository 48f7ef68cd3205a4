"""``afkern-bench``: the benchmark suite of afkern.

What is timed (every provider computes the same function with the same weights):

* **block** -- the BertOutput replacement alone: ``module(hidden_states [B, S, I], input_tensor
  [B, S, d]) -> [B, S, d]`` = dense + dropout + N Pfeiffer adapters + dynamic AdapterFusion +
  LayerNorm, at BERT-base width by default (d=768, I=3072, reduction factor 16 so r=48).

  - ``adapters``: AdapterHub's patched ``BertOutput`` (``model.encoder.layer[0].output`` of an
    ``adapters.init(BertModel)`` with N ``seq_bn`` adapters and an active ``Fuse(...)``), called
    directly as ``module(hidden_states, input_tensor)``. Outside a model forward there is no
    ``ForwardContext``; ``adapters`` 1.3 needs none for a plain Fuse (it then stores no fusion
    attentions), and the guard below checks that the call computes the fused function.
  - ``reference`` / ``torch`` / ``triton`` / ``cuda``: afkern's ``FusedAdapterBlock`` taken from
    ``afkern.from_adapterhub`` of that same model (identical weights), with that backend.
  - ``plain``: the model's own ``BertOutput`` without adapters (dense + LayerNorm), the floor.
  - ``plain_layer``: a whole plain ``BertLayer`` (attention + feed-forward) at the same tokens; the
    unit in which the cost of one added adapter is expressed.

  Modes: ``forward`` (inference, ``torch.no_grad``: afkern's folded path), ``backward`` (fusion
  training: the backward alone of a retained graph, with gradients to the query/key/value weights
  and to both inputs; adapters, dense and LayerNorm frozen) and ``full`` (forward + backward).

* **model** -- a whole BERT encoder (``--layers``, 12 by default, 4 with ``--quick``) with the
  Fuse(N) at every layer's BertOutput, against ``plain``, the same model without adapters. Input
  is ``inputs_embeds`` [B, S, d]. Modes: ``inference`` (``no_grad``) and ``train_step`` (forward +
  backward of a fusion-training step: gradients to every layer's query/key/value and to the
  input embeddings, everything else frozen; for ``plain`` the same backward to the input, which
  has no weight to train; the optimizer step is not included).

All modules run in ``eval()`` mode (dropout off) so that every provider computes one
deterministic function and can be checked against the oracle.

Correctness guard: before a provider is timed, its output (a ``no_grad`` call and a grad-enabled
call) and every gradient (inputs; query/key/value of every fused site) are compared with afkern's
``reference`` provider (the naive per-adapter oracle) on the same inputs; the relative error
``||a - ref|| / ||ref||`` must be within the dtype's tolerance. A provider that fails, raises or
cannot run is reported with its status (table and CSV) and not timed.

Timing: warm-up calls, then ``--repeats`` samples per case with the providers interleaved
round-robin (the start of each round rotates; ratios are medians over rounds of the per-round
ratio, so a slow spell of a shared machine hits both sides of a ratio); a sample runs the call ``inner`` times back to
back (``inner`` chosen so that a sample lasts at least ``--min-sample-ms``) and records the mean.
The table gives the median and the 20th/80th percentiles of the samples. CPU: ``time.perf_counter``
(``--clock process``: ``time.process_time``, the CPU time of this process's threads, which other
processes on a shared machine do not inflate; use it with ``--threads 1``, since idle OpenMP threads
spin). CUDA: CUDA events around the sample. The 1-minute load average is recorded with each group.

Peak memory: one extra call after timing. CUDA: ``torch.cuda.max_memory_allocated`` minus the
memory allocated before the call. CPU: the peak of the CPU allocator's "Total Allocated" counter
recorded by ``torch.profiler`` (``profile_memory=True``) during the call, which counts from zero
at the profiler's start: the peak of the tensor memory the call allocates on top of what already
existed (weights, inputs and, in ``backward`` mode, the retained graph are not counted). The
process RSS is not used: ``ru_maxrss`` only ever grows, so it cannot attribute a peak to a call.

Outputs under ``<output-dir>/<device-slug>/`` (``cpu`` or the GPU name): ``bench.csv``,
``block_<mode>_t<tokens>.png`` (time against N per provider with a linear fit),
``model_ratio.png`` (whole-model cost relative to the plain model against N), ``results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._io import atomic_write_bytes

__all__ = ["main", "PROVIDERS", "Provider", "Runner", "Setup", "BenchShape", "CSV_COLUMNS"]

BLOCK_MODES = ("forward", "backward", "full")
MODEL_MODES = ("inference", "train_step")
AFKERN_BACKENDS = ("reference", "torch", "triton", "cuda")
# Relative Frobenius error allowed against the reference provider, per dtype.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
CSV_COLUMNS = [
    "kind", "provider", "mode", "n", "tokens", "batch", "seq_len", "layers", "hidden", "intermediate",
    "bottleneck", "dtype", "status", "rel_err", "median_ms", "p20_ms", "p80_ms", "repeats", "inner",
    "peak_mem_mb", "speedup_vs_adapters", "ratio_to_plain", "device", "device_type", "threads", "clock", "load1",
    "torch", "transformers", "adapters", "triton", "afkern", "python", "timestamp",
]


class ProviderUnavailable(RuntimeError):
    """The provider cannot run here (missing package, wrong device, backend not built)."""


# ------------------------------------------------------------------------------------ setup
@dataclass
class BenchShape:
    """Model width. Defaults: BERT-base (d=768, intermediate 3072, 12 heads), r = d / 16 = 48."""

    hidden: int = 768
    intermediate: int = 3072
    heads: int = 12
    reduction_factor: int = 16

    @property
    def bottleneck(self) -> int:
        return self.hidden // self.reduction_factor


def _bert_config(shape: BenchShape, layers: int, seq_len: int):
    from transformers import BertConfig

    if shape.hidden % shape.heads:
        raise ValueError(f"--hidden-size {shape.hidden} must be a multiple of --heads {shape.heads}")
    if shape.hidden % shape.reduction_factor:
        raise ValueError(f"--hidden-size {shape.hidden} must be a multiple of --reduction-factor {shape.reduction_factor}")
    return BertConfig(
        vocab_size=128,  # inputs are embeddings; a small vocabulary keeps memory and build time down
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
        num_attention_heads=shape.heads, max_position_embeddings=max(512, seq_len),
    )


def _adapters_available() -> Tuple[bool, str]:
    try:
        import adapters  # noqa: F401
    except Exception as exc:
        return False, f"the adapters package is not importable ({exc}); pip install adapters"
    return True, "ok"


_ADAPTER_W = re.compile(r"\.adapters\.[^.]+\.adapter_(down|up)|\.output\.(down|up)_(weight|bias)$")
_FUSION_QK = re.compile(r"\.adapter_fusion_layer\.[^.]+\.(query|key)\.|\.output\.(query|key)\.")
_FUSION_V = re.compile(r"\.adapter_fusion_layer\.[^.]+\.value\.|\.output\.value\.")


def _qk_std(p: torch.Tensor) -> float:
    # scores grow like d * std_q * std_k; this keeps the fusion softmax peaked but not one-hot
    return 0.05 * (64.0 / p.shape[-1]) ** 0.5


@torch.no_grad()
def _perturb(module: nn.Module, generator: torch.Generator) -> None:
    """Adapter and fusion weights large enough that the fusion softmax is far from uniform, so the
    correctness guard sees errors in the score path (the initialisations give p ~ 1/N). Only the
    adapters' and the fusion's weights are touched, never the BERT weights."""
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=generator).to(p)
        if _ADAPTER_W.search(name) or _FUSION_QK.search(name):
            p.copy_(noise * (_qk_std(p) if _FUSION_QK.search(name) and p.dim() > 1 else (0.05 if p.dim() > 1 else 0.02)))
        elif _FUSION_V.search(name):
            p.add_(noise * 0.01)


class Setup:
    """One set of models with identical weights for a given N: the AdapterHub model (``am``, when
    ``adapters`` imports), afkern's converted model (``fm``, backend ``reference``) and the plain
    model (``pm``), in ``eval()`` mode, with every weight frozen except the fusions' query, key
    and value (fusion training)."""

    def __init__(self, shape: BenchShape, n: int, layers: int, seq_len: int, device, dtype, seed: int = 0):
        import afkern
        from transformers import BertModel

        self.shape, self.n, self.layers, self.device, self.dtype = shape, n, layers, torch.device(device), dtype
        self.names = [f"task{i}" for i in range(n)]
        gen = torch.Generator().manual_seed(seed + 1000 * n + layers)
        torch.manual_seed(seed)
        config = _bert_config(shape, layers, seq_len)
        ok, self.adapters_reason = _adapters_available()
        self.am = None
        if ok:
            import adapters
            from adapters import SeqBnConfig
            from adapters.composition import Fuse

            am = BertModel(config)
            adapters.init(am)
            for name in self.names:
                am.add_adapter(name, config=SeqBnConfig(reduction_factor=shape.reduction_factor))
            fuse = Fuse(*self.names)
            am.add_adapter_fusion(fuse)
            am.set_active_adapters(fuse)
            _perturb(am, gen)
            am.eval()
            fm = afkern.from_adapterhub(am, backend="reference")
            am.to(device=self.device, dtype=dtype)
            self.am = am
            self.fusion_name = fuse.name
        else:  # afkern alone: AdapterHub's initialisation through patch_bert, same perturbation
            fm = afkern.patch_bert(BertModel(config), self.names, backend="reference")
            _perturb(fm, gen)
        skip = re.compile(r"\.adapters\.|\.adapter_fusion_layer\.|invertible_adapters|prefix_tuning|prompt_tuning|"
                          r"shared_parameters|_extra_state$|\.output\.(query|key|value|down_weight|down_bias|up_weight|up_bias)\b")
        self.pm = BertModel(config)
        src = (self.am if self.am is not None else fm).state_dict()
        sd = {k: v for k, v in src.items() if not skip.search(k)}
        self.pm.load_state_dict(sd, strict=True)
        self.fm = fm.to(device=self.device, dtype=dtype).eval()
        self.pm = self.pm.to(device=self.device, dtype=dtype).eval()
        for m in (self.am, self.fm, self.pm):
            if m is not None:
                _freeze_except_fusion(m)

    # modules ---------------------------------------------------------------------------------
    def adapters_fusion_params(self, root: nn.Module) -> List[torch.Tensor]:
        out = []
        for layer in root.encoder.layer:
            fl = layer.output.adapter_fusion_layer[self.fusion_name]
            out += [fl.query.weight, fl.query.bias, fl.key.weight, fl.key.bias, fl.value.weight]
        return out


def _freeze_except_fusion(model: nn.Module) -> None:
    from .block import FusedAdapterBlock

    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, FusedAdapterBlock):
            for lin in (m.query, m.key, m.value):
                if lin is not None:
                    for p in lin.parameters():
                        p.requires_grad_(True)
        fl = getattr(m, "adapter_fusion_layer", None)
        if isinstance(fl, nn.ModuleDict):
            for p in fl.parameters():
                p.requires_grad_(True)


def _afkern_fusion_params(root: nn.Module) -> List[torch.Tensor]:
    from .patching import fused_blocks

    out = []
    for _, b in fused_blocks(root):
        out += [b.query.weight, b.query.bias, b.key.weight, b.key.bias, b.value.weight]
    return out


# ------------------------------------------------------------------------------------ providers
@dataclass
class Runner:
    """``fn(*inputs) -> Tensor`` and the trainable fusion tensors whose gradients are checked
    (in a canonical order shared by every provider; empty for the plain baselines)."""

    fn: Callable[..., torch.Tensor]
    fusion_params: List[torch.Tensor] = field(default_factory=list)


@dataclass
class Provider:
    """A way to compute the block / the model. ``build(setup, kind)`` returns a :class:`Runner` or
    raises :class:`ProviderUnavailable`. ``checked``: compared with the reference (the plain
    baselines compute another function and are not)."""

    name: str
    build: Callable[[Setup, str], Runner]
    checked: bool = True
    kinds: Tuple[str, ...] = ("block", "model")
    description: str = ""


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def _build_adapters(setup: Setup, kind: str) -> Runner:
    if setup.am is None:
        raise ProviderUnavailable(setup.adapters_reason)
    if kind == "block":
        mod = setup.am.encoder.layer[0].output
        return Runner(lambda h, x: mod(h, x), setup.adapters_fusion_params(setup.am)[:5])
    model = setup.am
    return Runner(lambda e: model(inputs_embeds=e).last_hidden_state, setup.adapters_fusion_params(model))


def _afkern_builder(backend: str) -> Callable[[Setup, str], Runner]:
    def build(setup: Setup, kind: str) -> Runner:
        from .backends import backend_status
        from .patching import set_backend

        ok, why = backend_status(backend, setup.device)
        if not ok:
            raise ProviderUnavailable(why)
        if kind == "block":
            block = copy.deepcopy(setup.fm.encoder.layer[0].output)
            try:
                set_backend(block, backend)
            except (RuntimeError, ValueError) as exc:
                raise ProviderUnavailable(str(exc)) from None
            return Runner(lambda h, x: block(h, x), _afkern_fusion_params(block))
        model = copy.deepcopy(setup.fm)
        try:
            set_backend(model, backend)
        except (RuntimeError, ValueError) as exc:
            raise ProviderUnavailable(str(exc)) from None
        return Runner(lambda e: model(inputs_embeds=e).last_hidden_state, _afkern_fusion_params(model))

    return build


def _build_plain(setup: Setup, kind: str) -> Runner:
    if kind == "block":
        mod = setup.pm.encoder.layer[0].output
        return Runner(lambda h, x: mod(h, x))
    model = setup.pm
    return Runner(lambda e: model(inputs_embeds=e).last_hidden_state)


def _build_plain_layer(setup: Setup, kind: str) -> Runner:
    layer = setup.pm.encoder.layer[0]
    return Runner(lambda h, x: _first(layer(x)))


PROVIDERS: Dict[str, Provider] = {
    "plain": Provider("plain", _build_plain, checked=False, description="no adapters (BertOutput / BertModel)"),
    "plain_layer": Provider("plain_layer", _build_plain_layer, checked=False, kinds=("block",),
                            description="a whole plain BertLayer, the unit of the per-adapter cost"),
    "adapters": Provider("adapters", _build_adapters, description="AdapterHub adapters, Fuse(N)"),
    **{b: Provider(b, _afkern_builder(b), description=f"afkern FusedAdapterBlock, backend {b!r}") for b in AFKERN_BACKENDS},
}
BASELINES = ("plain", "plain_layer")


def default_providers(device: torch.device) -> List[str]:
    """Baselines, ``adapters`` and every afkern backend that can run on ``device`` (the Triton
    interpreter on CPU is a test tool, not a provider worth timing: named explicitly only)."""
    from .backends import backend_status

    out = ["plain", "plain_layer", "adapters"]
    for b in AFKERN_BACKENDS:
        if b == "triton" and device.type != "cuda":
            continue
        if backend_status(b, device)[0]:
            out.append(b)
    return out


# ------------------------------------------------------------------------------------ timing
@contextlib.contextmanager
def _quiet_fd2():
    """Silence C-level stderr (kineto prints a line at every profiler start and stop)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(call: Callable[[], object], inner: int, device: torch.device, clock: str = "wall") -> float:
    """Mean milliseconds of one call over ``inner`` back-to-back calls (CPU: ``clock`` "wall" is
    ``time.perf_counter``, "process" is ``time.process_time``, the CPU time of all this process's
    threads, which other processes on a shared machine do not inflate)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    timer = time.process_time if clock == "process" else time.perf_counter
    t0 = timer()
    for _ in range(inner):
        call()
    return (timer() - t0) * 1e3 / inner


def peak_memory_mb(call: Callable[[], object], device: torch.device) -> float:
    """Peak of the memory ``call`` allocates beyond what already exists, in MiB (see module doc)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        with _quiet_fd2():
            prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0),
                 key=lambda e: (e.get("ts", 0), e["args"].get("Ev Idx", 0)))
    if not mem:
        return 0.0
    # "Total Allocated" is the profiler's running count, not reset between sessions: measure from
    # its value just before this session's first event.
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in mem) - base) / 2**20


def _percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[k] / den[k]``: both samples of a pair come from the same
    round-robin round, so a slow spell of the machine affects both and cancels."""
    pairs = [a / b for a, b in zip(num, den) if b > 0]
    return _percentile(pairs, 0.5) if pairs else float("nan")


@dataclass
class Case:
    """One provider in one (kind, mode, n, tokens) group: ``prepare()`` (untimed) returns the
    callable to time."""

    provider: str
    prepare: Callable[[], Callable[[], object]]
    samples: List[float] = field(default_factory=list)
    inner: int = 1
    peak_mb: float = float("nan")


def run_group(cases: List[Case], repeats: int, warmup: int, min_sample_ms: float, device: torch.device,
              clock: str = "wall") -> None:
    """Warm up each case, pick its ``inner``, then take ``repeats`` samples of all cases
    round-robin (the starting case rotates each round), then measure peak memory once."""
    calls = {}
    for c in cases:
        call = c.prepare()
        t = float("inf")
        for _ in range(max(warmup, 1)):  # the last warm-up call also sets ``inner``
            _sync(device)
            t = _time_once(call, 1, device, clock)
        c.inner = max(1, min(1000, math.ceil(min_sample_ms / max(t, 1e-6)))) if t < min_sample_ms else 1
        calls[c.provider] = call
    for rep in range(repeats):
        k = rep % len(cases)
        for c in cases[k:] + cases[:k]:
            c.samples.append(_time_once(calls[c.provider], c.inner, device, clock))
    for c in cases:
        c.peak_mb = peak_memory_mb(c.prepare(), device)


# ------------------------------------------------------------------------------------ cases
def _tokens_shape(tokens: int, seq_len: int) -> Tuple[int, int]:
    if tokens < 1:
        raise ValueError(f"token counts must be positive, got {tokens}")
    if tokens <= seq_len:
        return 1, tokens
    if tokens % seq_len:
        raise ValueError(f"--tokens / --model-tokens {tokens} must be at most or a multiple of --seq-len {seq_len}")
    return tokens // seq_len, seq_len


def _inputs(setup: Setup, kind: str, tokens: int, seq_len: int, seed: int):
    B, S = _tokens_shape(tokens, seq_len)
    g = torch.Generator().manual_seed(seed)
    d, I = setup.shape.hidden, setup.shape.intermediate
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(setup.device, setup.dtype)  # noqa: E731
    if kind == "block":
        return (mk(B, S, I, scale=0.5), mk(B, S, d)), (B, S)
    return (mk(B, S, d),), (B, S)


def _rel_err(a: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``||a - ref|| / max(||ref||, floor)`` in float64 (inf on a shape mismatch or non-finite)."""
    a, ref = a.detach().double(), ref.detach().double()
    if a.shape != ref.shape:
        return float("inf")
    num = (a - ref).norm().item()
    if not math.isfinite(num):
        return float("inf")
    denom = max(ref.norm().item(), floor)
    return num / denom if denom > 0 else num


def _evaluate(runner: Runner, inputs, dy, grads: bool):
    """(no-grad output, grad-enabled output, [input grads + fusion grads])."""
    with torch.no_grad():
        out_ng = runner.fn(*inputs).detach().clone()
    if not grads:
        return out_ng, None, None
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    for p in runner.fusion_params:
        p.grad = None
    out = runner.fn(*xs)
    out.backward(dy)
    gs = [x.grad.detach().clone() for x in xs] + [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                                                   for p in runner.fusion_params]
    for p in runner.fusion_params:
        p.grad = None
    return out_ng, out.detach().clone(), gs


def check_provider(runner: Runner, ref, inputs, dy, dtype, grads: bool) -> Tuple[str, float]:
    """Compare a provider with the reference outputs; returns (status, worst relative error)."""
    out_ng, out, gs = _evaluate(runner, inputs, dy, grads)
    r_ng, r_out, r_gs = ref
    errs = [_rel_err(out_ng, r_ng)]
    if grads:
        errs.append(_rel_err(out, r_out))
        if len(gs) != len(r_gs):
            return f"mismatch: {len(gs)} gradients, reference has {len(r_gs)}", float("inf")
        n_in = len(inputs)
        errs += [_rel_err(g, r) for g, r in zip(gs[:n_in], r_gs[:n_in])]
        # Fusion gradients: some are exactly zero in exact arithmetic (the key bias shifts every
        # score equally; with N = 1 the softmax is constant), so the reference holds only rounding
        # noise there. Their error is measured against 1% of the largest fusion gradient.
        floor = 1e-2 * max([r.detach().double().norm().item() for r in r_gs[n_in:]] + [0.0])
        errs += [_rel_err(g, r, floor) for g, r in zip(gs[n_in:], r_gs[n_in:])]
    worst = max(errs)
    tol = TOLERANCE.get(dtype, 3e-2)
    if not worst <= tol:
        return f"mismatch: rel err {worst:.2e} > tol {tol:.0e}", worst
    return "ok", worst


def _make_prepare(runner: Runner, inputs, dy, mode: str) -> Callable[[], Callable[[], object]]:
    """The untimed preparation of one timed call for a mode. Gradient modes drop the previous
    gradients before each call (a training step starts from ``zero_grad(set_to_none=True)``), so
    no call pays for accumulating into the last call's ``.grad``."""
    if mode in ("forward", "inference"):
        def prepare():
            def call():
                with torch.no_grad():
                    return runner.fn(*inputs)
            return call
        return prepare

    def clear(xs):
        for t in list(xs) + list(runner.fusion_params):
            t.grad = None

    if mode == "backward":
        def prepare():
            xs = [t.detach().clone().requires_grad_(True) for t in inputs]
            clear(xs)
            out = runner.fn(*xs)

            def call():
                clear(xs)
                out.backward(dy, retain_graph=True)
            return call
        return prepare

    def prepare():  # full / train_step
        xs = [t.detach().clone().requires_grad_(True) for t in inputs]

        def call():
            clear(xs)
            runner.fn(*xs).backward(dy)
        return call
    return prepare


# ------------------------------------------------------------------------------------ environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _load1() -> float:
    """The 1-minute load average: other work on the machine shows up in the timings."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return float("nan")


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def library_versions() -> Dict[str, str]:
    from importlib import metadata

    import afkern

    out = {"torch": torch.__version__, "afkern": afkern.__version__, "python": platform.python_version()}
    for pkg in ("transformers", "adapters", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = ""
    return out


# ------------------------------------------------------------------------------------ writers
def write_csv(path: str, rows: List[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt_csv(r.get(k, "")) for k in CSV_COLUMNS})
    atomic_write_bytes(path, buf.getvalue().encode())


def _fmt_csv(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _fmt(v, spec=".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return "-"
    return format(v, spec)


def format_table(rows: List[dict]) -> str:
    head = ["kind", "mode", "N", "tokens", "provider", "status", "median ms", "p20", "p80", "peak MiB", "vs adapters", "vs plain"]
    body = []
    for r in rows:
        st = r["status"]
        body.append([
            r["kind"], r["mode"], str(r["n"]), str(r["tokens"]), r["provider"], st if len(st) <= 40 else st[:37] + "...",
            _fmt(r.get("median_ms")), _fmt(r.get("p20_ms")), _fmt(r.get("p80_ms")), _fmt(r.get("peak_mem_mb"), ".1f"),
            _fmt(r.get("speedup_vs_adapters"), ".2f") + ("x" if _fmt(r.get("speedup_vs_adapters")) != "-" else ""),
            _fmt(r.get("ratio_to_plain"), ".2f") + ("x" if _fmt(r.get("ratio_to_plain")) != "-" else ""),
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def linear_fits(rows: List[dict]) -> List[dict]:
    """Least-squares ``time = intercept + slope * N`` per (provider, mode, tokens) of the block, and
    the slope as a percentage of a plain BertLayer's time in the same mode and tokens."""
    import numpy as np

    fits = []
    ok = [r for r in rows if r["kind"] == "block" and r["status"] == "ok" and r["provider"] not in BASELINES
          and isinstance(r.get("median_ms"), float)]
    layers: Dict[Tuple[str, int], List[float]] = {}
    for r in rows:  # plain_layer is timed with every N: its median over all of them
        if r["kind"] == "block" and r["provider"] == "plain_layer" and isinstance(r.get("median_ms"), float):
            layers.setdefault((r["mode"], r["tokens"]), []).append(r["median_ms"])
    layer = {k: _percentile(v, 0.5) for k, v in layers.items()}
    keys = sorted({(r["provider"], r["mode"], r["tokens"]) for r in ok})
    for prov, mode, tokens in keys:
        pts = sorted((r["n"], r["median_ms"]) for r in ok if (r["provider"], r["mode"], r["tokens"]) == (prov, mode, tokens))
        if len(pts) < 2:
            continue
        ns, ts = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        slope, intercept = np.polyfit(ns, ts, 1)
        base = layer.get((mode, tokens))
        fits.append({"provider": prov, "mode": mode, "tokens": tokens, "slope_ms": float(slope),
                     "intercept_ms": float(intercept), "points": len(pts),
                     "slope_pct_of_layer": float(100 * slope / base) if base else float("nan")})
    return fits


def model_slopes(rows: List[dict]) -> List[dict]:
    """Whole model: slope of time against N per provider and mode, per layer, as % of a plain
    layer (the plain model's time / layers)."""
    import numpy as np

    out = []
    ok = [r for r in rows if r["kind"] == "model" and r["status"] == "ok" and r["provider"] != "plain"
          and isinstance(r.get("median_ms"), float)]
    plain = {}
    for r in rows:
        if r["kind"] == "model" and r["provider"] == "plain" and isinstance(r.get("median_ms"), float):
            plain.setdefault((r["mode"], r["tokens"]), []).append(r["median_ms"] / r["layers"])
    for prov, mode, tokens in sorted({(r["provider"], r["mode"], r["tokens"]) for r in ok}):
        sel = [r for r in ok if (r["provider"], r["mode"], r["tokens"]) == (prov, mode, tokens)]
        if len({r["n"] for r in sel}) < 2:
            continue
        slope, intercept = np.polyfit([r["n"] for r in sel], [r["median_ms"] / r["layers"] for r in sel], 1)
        base = plain.get((mode, tokens))
        out.append({"provider": prov, "mode": mode, "tokens": tokens, "slope_ms_per_layer": float(slope),
                    "slope_pct_of_layer": float(100 * slope / (sum(base) / len(base))) if base else float("nan")})
    return out


def _save_fig(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def write_plots(out_dir: str, rows: List[dict], fits: List[dict], title: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    blocks = [r for r in rows if r["kind"] == "block" and r["status"] == "ok" and isinstance(r.get("median_ms"), float)]
    for mode, tokens in sorted({(r["mode"], r["tokens"]) for r in blocks}):
        sel = [r for r in blocks if (r["mode"], r["tokens"]) == (mode, tokens)]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ns_all = sorted({r["n"] for r in sel if r["provider"] not in BASELINES})
        for prov in sorted({r["provider"] for r in sel}):
            pts = sorted((r["n"], r["median_ms"], r["p20_ms"], r["p80_ms"]) for r in sel if r["provider"] == prov)
            if prov in BASELINES:  # timed with every N: the median of its medians
                y = _percentile([p[1] for p in pts], 0.5)
                ax.axhline(y, ls=":", color="gray" if prov == "plain" else "black", lw=1, label=f"{prov} ({y:.2f} ms)")
                continue
            ns = [p[0] for p in pts]
            line = ax.errorbar(ns, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                               marker="o", ls="none", capsize=3)
            fit = next((f for f in fits if (f["provider"], f["mode"], f["tokens"]) == (prov, mode, tokens)), None)
            if fit is not None and ns_all:
                xs = np.linspace(min(ns_all), max(ns_all), 50)
                ax.plot(xs, fit["intercept_ms"] + fit["slope_ms"] * xs, color=line[0].get_color(), lw=1,
                        label=f"{prov}: {fit['intercept_ms']:.2f} + {fit['slope_ms']:.3f}*N ms")
            else:
                line[0].set_label(prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (adapters fused)")
        ax.set_ylabel("time per call (ms, median, p20-p80)")
        ax.set_title(f"fused block, {mode}, {tokens} tokens\n{title}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(out_dir, f"block_{mode}_t{tokens}.png")
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)
    models = [r for r in rows if r["kind"] == "model" and r["status"] == "ok" and isinstance(r.get("ratio_to_plain"), float)
              and r["provider"] != "plain" and not math.isnan(r["ratio_to_plain"])]
    if models:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for prov, mode, tokens in sorted({(r["provider"], r["mode"], r["tokens"]) for r in models}):
            pts = sorted((r["n"], r["ratio_to_plain"]) for r in models if (r["provider"], r["mode"], r["tokens"]) == (prov, mode, tokens))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if mode == "inference" else "--",
                    label=f"{prov} {mode} ({tokens} tok)")
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (adapters fused)")
        ax.set_ylabel("time / plain model time")
        layers = models[0]["layers"]
        ax.set_title(f"whole BERT ({layers} layers) with Fuse(N) vs the plain model\n{title}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(out_dir, "model_ratio.png")
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def target_lines(rows: List[dict], fits: List[dict], device: torch.device, fast: str) -> List[str]:
    """The issue's performance targets, measured in this run (CPU targets on CPU, GPU on CUDA)."""
    lines = []

    def med(kind, prov, mode, n, tokens=None):
        c = [r for r in rows if (r["kind"], r["provider"], r["mode"], r["n"]) == (kind, prov, mode, n)
             and r["status"] == "ok" and isinstance(r.get("median_ms"), float) and (tokens is None or r["tokens"] == tokens)]
        return c[-1] if c else None

    n = 16
    btok = sorted({r["tokens"] for r in rows if r["kind"] == "block" and r["n"] == n})
    if device.type != "cuda":
        for mode, want in (("forward", 4.0), ("full", 3.5)):
            for t in btok:
                a, f = med("block", "adapters", mode, n, t), med("block", fast, mode, n, t)
                if a and f:
                    s = a["median_ms"] / f["median_ms"]
                    lines.append(f"block N={n} {t} tok {mode}: {fast} {s:.2f}x faster than adapters "
                                 f"(target >= {want}x: {'met' if s >= want else 'MISSED'})")
    mtok = sorted({r["tokens"] for r in rows if r["kind"] == "model" and r["n"] == n})
    goals = {"inference": 1.35} if device.type != "cuda" else {"inference": 1.3, "train_step": 1.5}
    for mode, want in goals.items():
        for t in mtok:
            f, a = med("model", fast, mode, n, t), med("model", "adapters", mode, n, t)
            if f and isinstance(f.get("ratio_to_plain"), float):
                extra = f"; adapters {a['ratio_to_plain']:.2f}x" if a and isinstance(a.get("ratio_to_plain"), float) else ""
                lines.append(f"model Fuse({n}) {t} tok {mode}: {fast} {f['ratio_to_plain']:.2f}x the plain model{extra} "
                             f"(target <= {want}x: {'met' if f['ratio_to_plain'] <= want else 'MISSED'})")
    for fit in fits:
        if fit["provider"] == fast and not math.isnan(fit["slope_pct_of_layer"]):
            p = fit["slope_pct_of_layer"]
            lines.append(f"block {fit['mode']} {fit['tokens']} tok: +{fit['slope_ms']:.3f} ms per added adapter = "
                         f"{p:.2f}% of a plain layer (target <= 2%: {'met' if p <= 2.0 else 'MISSED'})")
    return lines


def _load_range(rows: List[dict]) -> str:
    loads = [r["load1"] for r in rows if isinstance(r.get("load1"), float) and not math.isnan(r["load1"])]
    return f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs" if loads else "unknown"


def write_markdown(path: str, rows, fits, mslopes, targets, meta: Dict[str, str], argv: List[str]) -> None:
    out = [f"# afkern-bench results: {meta['device']}", "",
           f"Command: `afkern-bench {' '.join(argv)}`  ",
           f"Date: {meta['timestamp']}; dtype {meta['dtype']}; torch threads {meta['threads']}; timer {meta['clock']}; "
           f"1-minute load average during the timings {_load_range(rows)}; "
           f"torch {meta['torch']}, transformers {meta['transformers']}, adapters {meta['adapters'] or '-'}, "
           f"triton {meta['triton'] or '-'}, afkern {meta['afkern']}.", "",
           "Times are per call, median of the round-robin samples (p20-p80 in the CSV). `vs adapters` = "
           "adapters time / this time (speed-up); `vs plain` = this time / the plain baseline (cost ratio; block: "
           "BertOutput without adapters, model: BERT without adapters); both ratios are medians over rounds of the "
           "ratio of the two samples taken in the same round. What is timed: see `afkern/bench.py`.", ""]
    if targets:
        out += ["## Targets", ""] + [f"- {t}" for t in targets] + [""]
    if fits:
        out += ["## Linear fits, block time against N", "", "| provider | mode | tokens | intercept ms | slope ms/adapter | slope % of a plain layer |",
                "|---|---|---|---|---|---|"]
        out += [f"| {f['provider']} | {f['mode']} | {f['tokens']} | {f['intercept_ms']:.3f} | {f['slope_ms']:.4f} | "
                f"{_fmt(f['slope_pct_of_layer'], '.2f')} |" for f in fits] + [""]
    if mslopes:
        out += ["## Whole model: added cost per adapter per layer", "", "| provider | mode | tokens | ms per adapter per layer | % of a plain layer |",
                "|---|---|---|---|---|"]
        out += [f"| {m['provider']} | {m['mode']} | {m['tokens']} | {m['slope_ms_per_layer']:.4f} | {_fmt(m['slope_pct_of_layer'], '.2f')} |"
                for m in mslopes] + [""]
    out += ["## All cases", "", format_table(rows), ""]
    atomic_write_bytes(path, "\n".join(out).encode())


# ------------------------------------------------------------------------------------ driver
def _int_list(s: str) -> List[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _str_list(s: str) -> List[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="afkern-bench",
        description="Cost of AdapterFusion: afkern's fused block and a whole BERT against AdapterHub's adapters "
                    "and the plain model, against the number of fused adapters N. Prints a table; writes CSV, PNG "
                    "plots and results.md under OUTPUT_DIR/<device>/. Every provider is checked against afkern's "
                    "reference before it is timed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="small sweep (block N=1,4,16 at 256 tokens; 4-layer model at N=1,16, 128 tokens; 5 repeats); "
                        "reference only as the correctness oracle, not timed, unless named in --providers")
    p.add_argument("--output-dir", default="bench-results", help="results go to OUTPUT_DIR/<device-slug>/ (cpu, or the GPU name)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:K (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--providers", type=_str_list, default=None,
                   help=f"comma-separated, from {sorted(PROVIDERS)}; default: plain, plain_layer, adapters and every "
                        "afkern backend that can run on the device")
    p.add_argument("--n-adapters", type=_int_list, default=None, help="block: N values (default 1,2,4,8,16,32,64)")
    p.add_argument("--tokens", type=_int_list, default=None, help="block: token counts B*S (default 256,1024)")
    p.add_argument("--modes", type=_str_list, default=None, help=f"block modes from {list(BLOCK_MODES)} (default all)")
    p.add_argument("--model-n-adapters", type=_int_list, default=None, help="whole model: N values (default 1,4,16,64)")
    p.add_argument("--model-tokens", type=_int_list, default=None, help="whole model: token counts B*S (default 512)")
    p.add_argument("--model-modes", type=_str_list, default=None, help=f"model modes from {list(MODEL_MODES)} (default all)")
    p.add_argument("--layers", type=int, default=None, help="whole model: encoder layers (default 12; 4 with --quick)")
    p.add_argument("--no-block", action="store_true", help="skip the block benchmark")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model benchmark")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length S; a token count T runs as [T/S, S] (or [1, T] if T <= S)")
    p.add_argument("--hidden-size", type=int, default=768, help="d")
    p.add_argument("--intermediate-size", type=int, default=3072, help="BertOutput's input width")
    p.add_argument("--heads", type=int, default=12, help="attention heads (plain_layer and the model)")
    p.add_argument("--reduction-factor", type=int, default=16, help="adapter bottleneck r = d / reduction factor")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per case (default 10; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per case (default 2 on CPU, 10 on CUDA)")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="a sample repeats the call until it lasts this long (default 20 on CPU, 5 on CUDA)")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="CPU timer: wall (perf_counter) or process (CPU time of all threads of this process: "
                        "robust to other processes on a shared machine, best with --threads 1); CUDA always uses events")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default, reported)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    return p


def _resolve_args(args) -> dict:
    q = args.quick
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("afkern-bench: --device cuda asked for, but torch.cuda.is_available() is False")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"afkern-bench: --device must be cpu or cuda[:K], got {args.device!r}")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    provs = args.providers
    if provs is not None:
        bad = [p for p in provs if p not in PROVIDERS]
        if bad:
            raise SystemExit(f"afkern-bench: unknown provider(s) {bad}; expected names from {sorted(PROVIDERS)}")
    else:
        provs = default_providers(device)
        if q:
            provs = [p for p in provs if p != "reference"]
    for name, given, allowed in (("--modes", args.modes, BLOCK_MODES), ("--model-modes", args.model_modes, MODEL_MODES)):
        if given is not None and (not given or any(m not in allowed for m in given)):
            raise SystemExit(f"afkern-bench: {name} must be from {list(allowed)}, got {given}")
    for name in ("layers", "repeats", "warmup", "seq_len", "threads"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            raise SystemExit(f"afkern-bench: --{name.replace('_', '-')} must be positive, got {v}")
    cfg = dict(
        device=device, dtype=dtype, providers=list(dict.fromkeys(provs)),
        block_n=args.n_adapters or ([1, 4, 16] if q else [1, 2, 4, 8, 16, 32, 64]),
        block_tokens=args.tokens or ([256] if q else [256, 1024]),
        block_modes=args.modes or list(BLOCK_MODES),
        model_n=args.model_n_adapters or ([1, 16] if q else [1, 4, 16, 64]),
        model_tokens=args.model_tokens or ([128] if q else [512]),
        model_modes=args.model_modes or list(MODEL_MODES),
        layers=args.layers or (4 if q else 12),
        repeats=args.repeats or (5 if q else 10),
        warmup=args.warmup if args.warmup is not None else (10 if device.type == "cuda" else (1 if q else 2)),
        min_sample_ms=args.min_sample_ms or (5.0 if device.type == "cuda" else 20.0),
        shape=BenchShape(args.hidden_size, args.intermediate_size, args.heads, args.reduction_factor),
    )
    for t in cfg["block_tokens"] + cfg["model_tokens"]:
        try:
            _tokens_shape(t, args.seq_len)
        except ValueError as exc:
            raise SystemExit(f"afkern-bench: {exc}") from None
    try:
        _bert_config(cfg["shape"], 1, args.seq_len)
    except ValueError as exc:
        raise SystemExit(f"afkern-bench: {exc}") from None
    return cfg


def _bench_kind(kind: str, cfg: dict, meta: dict, rows: List[dict], log) -> None:
    device, dtype, shape = cfg["device"], cfg["dtype"], cfg["shape"]
    ns = cfg["block_n"] if kind == "block" else cfg["model_n"]
    token_list = cfg["block_tokens"] if kind == "block" else cfg["model_tokens"]
    modes = cfg["block_modes"] if kind == "block" else cfg["model_modes"]
    layers = 1 if kind == "block" else cfg["layers"]
    wanted = [p for p in cfg["providers"] if kind in PROVIDERS[p].kinds]
    if not wanted:
        return
    grad_modes = any(m not in ("forward", "inference") for m in modes)
    for n in ns:
        t0 = time.perf_counter()
        setup = Setup(shape, n, layers, cfg["seq_len"], device, dtype, seed=cfg["seed"])
        runners: Dict[str, Runner] = {}
        status: Dict[str, str] = {}
        for name in dict.fromkeys(wanted + ["reference"]):
            try:
                runners[name] = PROVIDERS[name].build(setup, kind)
            except ProviderUnavailable as exc:
                status[name] = f"unavailable: {exc}"
            except Exception as exc:  # a provider that cannot even be built is reported, not fatal
                status[name] = f"error: {type(exc).__name__}: {exc}"
        if "reference" not in runners:
            raise RuntimeError(f"the reference provider could not be built: {status.get('reference')}")
        log(f"[{kind}] N={n}: built in {time.perf_counter() - t0:.1f}s")
        for tokens in token_list:
            inputs, (B, S) = _inputs(setup, kind, tokens, cfg["seq_len"], cfg["seed"] + tokens)
            g = torch.Generator().manual_seed(cfg["seed"] + 7)
            dy = torch.randn(inputs[-1].shape[:-1] + (shape.hidden,), generator=g).to(device, dtype)
            ref = _evaluate(runners["reference"], inputs, dy, grad_modes)
            st, errs = dict(status), {}
            for name in wanted:
                if name in st:
                    continue
                if not PROVIDERS[name].checked:
                    st[name], errs[name] = "ok", float("nan")
                    continue
                try:
                    st[name], errs[name] = check_provider(runners[name], ref, inputs, dy, dtype, grad_modes)
                except Exception as exc:
                    st[name], errs[name] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", float("nan")
                if st[name] != "ok":
                    log(f"[{kind}] N={n} tokens={tokens}: provider {name!r} not timed: {st[name]}")
            for mode in modes:
                cases = [Case(name, _make_prepare(runners[name], inputs, dy, mode)) for name in wanted if st[name] == "ok"]
                t1 = time.perf_counter()
                if cases:
                    run_group(cases, cfg["repeats"], cfg["warmup"], cfg["min_sample_ms"], device, cfg["clock"])
                load1 = _load1()
                log(f"[{kind}] N={n} tokens={tokens} {mode}: {len(cases)} providers in {time.perf_counter() - t1:.1f}s")
                by = {c.provider: c for c in cases}
                group = []
                for name in wanted:
                    c = by.get(name)
                    row = dict(meta, kind=kind, provider=name, mode=mode, n=0 if name in BASELINES else n, tokens=tokens,
                               batch=B, seq_len=S, layers=layers, hidden=shape.hidden,
                               intermediate=shape.intermediate, bottleneck=shape.bottleneck, status=st[name],
                               rel_err=errs.get(name, float("nan")), load1=load1 if cases else float("nan"))
                    if c is not None:
                        row.update(median_ms=_percentile(c.samples, 0.5), p20_ms=_percentile(c.samples, 0.2),
                                   p80_ms=_percentile(c.samples, 0.8), repeats=len(c.samples), inner=c.inner,
                                   peak_mem_mb=c.peak_mb)
                    group.append(row)
                for r in group:
                    c = by.get(r["provider"])
                    if c is None:
                        continue
                    a, p = by.get("adapters"), by.get("plain")
                    r["speedup_vs_adapters"] = (paired_ratio(a.samples, c.samples)
                                                if a is not None and r["provider"] not in BASELINES else float("nan"))
                    r["ratio_to_plain"] = (paired_ratio(c.samples, p.samples)
                                           if p is not None and r["provider"] != "plain_layer" else float("nan"))
                rows.extend(group)
        del setup, runners


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:  # main() may be called in-process (tests): leave torch's thread count as found
        torch.set_num_threads(threads_before)


def _run(args, argv: List[str]) -> int:
    cfg = _resolve_args(args)
    cfg.update(seq_len=args.seq_len, seed=args.seed, clock=args.clock)
    device = cfg["device"]
    import afkern
    from .backends import resolve_backend

    fast = resolve_backend("auto", device)
    versions = library_versions()
    meta = dict(device=device_name(device), device_type=device.type, threads=torch.get_num_threads(),
                clock="cuda-events" if device.type == "cuda" else args.clock,
                dtype=str(cfg["dtype"]).replace("torch.", ""), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **versions)
    out_dir = os.path.join(args.output_dir, device_slug(device))
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"afkern-bench {afkern.__version__} on {meta['device']} ({device.type}), {meta['dtype']}, "
        f"{meta['threads']} torch threads; providers {cfg['providers']}; afkern auto -> {fast!r}")
    log("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in versions.items()))
    t0 = time.perf_counter()
    rows: List[dict] = []
    for kind in ("block", "model"):
        if getattr(args, f"no_{kind}"):
            continue
        _bench_kind(kind, cfg, meta, rows, log)
        # keep partial results if a later part fails or is interrupted
        write_csv(os.path.join(out_dir, "bench.csv"), rows)
    fits = linear_fits(rows)
    mslopes = model_slopes(rows)
    targets = target_lines(rows, fits, device, fast)
    print()
    print(format_table(rows))
    if fits:
        print("\nlinear fits, block time = intercept + slope * N:")
        for f in fits:
            print(f"  {f['provider']:>9} {f['mode']:>8} {f['tokens']:>5} tok: intercept {f['intercept_ms']:.3f} ms, "
                  f"slope {f['slope_ms']:.4f} ms/adapter = {_fmt(f['slope_pct_of_layer'], '.2f')}% of a plain layer")
    if mslopes:
        print("whole model, added time per adapter per layer:")
        for m in mslopes:
            print(f"  {m['provider']:>9} {m['mode']:>10} {m['tokens']:>5} tok: {m['slope_ms_per_layer']:.4f} ms "
                  f"= {_fmt(m['slope_pct_of_layer'], '.2f')}% of a plain layer")
    if targets:
        print("targets (this run):")
        for t in targets:
            print("  " + t)
    write_csv(os.path.join(out_dir, "bench.csv"), rows)
    written = [os.path.join(out_dir, "bench.csv")]
    if not args.no_plots:
        title = f"{meta['device']}, {meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}"
        written += write_plots(out_dir, rows, fits, title)
    write_markdown(os.path.join(out_dir, "results.md"), rows, fits, mslopes, targets, meta, argv)
    written.append(os.path.join(out_dir, "results.md"))
    print(f"\nwrote {', '.join(written)} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
