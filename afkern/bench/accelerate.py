"""``afkern-bench --accelerate``: one AdapterHub model before and after ``afkern.accelerate`` (issue 20).

The case: an AdapterHub BERT at BERT-base width (``--hidden-size`` 768, ``--intermediate-size``
3072, ``--heads`` 12), ``--layers`` layers (default 4), N = ``--model-n-adapters`` Pfeiffer
adapters (default 16, reduction factor ``--reduction-factor``) and their dynamic ``Fuse``, a batch
of ``--model-tokens`` tokens (default 512) in sequences of ``--seq-len`` (default 128). Two modes,
each timed in one round-robin group (``afkern.bench.timing``), the same model object before and
after, so the ratio compares the two codes under the same machine conditions:

* ``inference``  -- eval, no_grad forward (afkern: folded weights);
* ``train_step`` -- ``train_adapter_fusion`` (adapters frozen, fusion trained, dropout on):
  forward, backward of a weighted mean of the output, AdamW step.

Providers: ``adapters`` (AdapterHub's own code), ``accelerated`` (the same model after
``afkern.accelerate``). Before timing, the accelerated output (inference) and fusion gradients
(training, same seed) are checked against AdapterHub's. Targets: inference at least 3x, training
step at least 2x. Writes ``accelerate.csv`` and ``accelerate.md`` under ``OUTPUT_DIR/<device-slug>/``.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Dict, List

import torch

from .._io import atomic_write_bytes
from . import env
from .options import case_group
from .report import fmt, write_csv
from .stats import paired_ratio, sample_columns
from .timing import Case, run_cases

__all__ = ["add_arguments", "run", "build_model", "TARGETS"]

TARGETS = {"inference": 3.0, "train_step": 2.0}
PROVIDERS = ("adapters", "accelerated")
COLUMNS = ["mode", "provider", "status", "rel_err", "median_ms", "p20_ms", "p80_ms", "repeats", "inner", "speedup",
           "tokens", "seq_len", "n_adapters", "layers", "hidden", "dtype", "device", "threads", "load1", "torch",
           "adapters", "afkern"]


def add_arguments(p) -> None:
    case_group(p, "an AdapterHub model before / after afkern.accelerate", "--accelerate",
               "an AdapterHub BERT with Fuse(N) before and after afkern.accelerate, inference and a fusion-training "
               "step (defaults: 4 layers, N=16, 512 tokens in sequences of 128)")


def build_model(shape, n: int, layers: int, device, dtype, seed: int):
    """An AdapterHub BertModel with N Pfeiffer adapters and their active dynamic Fuse, perturbed
    weights (``afkern.bench.models.perturb``), eval mode."""
    import adapters
    from adapters import Fuse
    from transformers import BertConfig, BertModel

    from .models import perturb

    cfg = BertConfig(vocab_size=128, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                     num_hidden_layers=layers, num_attention_heads=shape.heads, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    adapters.init(model)
    names = [f"task{i}" for i in range(n)]
    for name in names:
        model.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=shape.reduction_factor))
    model.add_adapter_fusion(Fuse(*names))
    model.set_active_adapters(Fuse(*names))
    with torch.no_grad():
        perturb(model, torch.Generator().manual_seed(seed + 1))
    return model.to(device=device, dtype=dtype).eval(), names


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is not ~0: the mean of a LayerNorm output is nearly constant."""
    w = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(3)).to(out)
    return (out * w).mean()


def _calls(model, ids, mask) -> Dict[str, callable]:
    @torch.no_grad()
    def inference():
        return model(ids, attention_mask=mask).last_hidden_state

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None

    def train_step():
        out = model(ids, attention_mask=mask).last_hidden_state
        _loss(out).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    return {"inference": inference, "train_step": train_step}


def _check(hub, acc, ids, mask, mode: str) -> float:
    """Relative error of the accelerated model against AdapterHub's: the output (inference) or the
    fusion gradients under the same seed (training)."""
    if mode == "inference":
        with torch.no_grad():
            return _rel(acc(ids, attention_mask=mask).last_hidden_state, hub(ids, attention_mask=mask).last_hidden_state)
    grads = []
    for m in (hub, acc):
        torch.manual_seed(0)
        m.zero_grad(set_to_none=True)
        _loss(m(ids, attention_mask=mask).last_hidden_state).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        m.zero_grad(set_to_none=True)
    return _rel(grads[1], grads[0])


def run(args, cfg: dict, out_dir: str, argv: List[str]) -> int:
    """The accelerate benchmark (module doc); returns the exit status."""
    import afkern

    device, dtype = cfg["device"], cfg["dtype"]
    layers = args.layers or 4
    tokens = (args.model_tokens or [512])[0]
    n = (args.model_n_adapters or [16])[0]
    seq_len = min(args.seq_len, tokens)
    if tokens % seq_len:
        raise SystemExit(f"afkern-bench: --model-tokens {tokens} must be a multiple of --seq-len {seq_len}")
    batch = tokens // seq_len
    versions = env.library_versions()
    meta = dict(device=env.device_name(device), threads=torch.get_num_threads(), dtype=str(dtype).replace("torch.", ""),
                **versions)
    print(f"afkern-bench --accelerate {afkern.__version__} on {meta['device']}, {meta['dtype']}, {meta['threads']} "
          f"threads: {layers} layers, d={cfg['shape'].hidden}, Fuse({n}), {batch} x {seq_len} tokens", flush=True)
    hub, names = build_model(cfg["shape"], n, layers, device, dtype, cfg["seed"])
    acc = afkern.accelerate(copy.deepcopy(hub))
    g = torch.Generator().manual_seed(cfg["seed"] + 7)
    ids = torch.randint(0, 128, (batch, seq_len), generator=g).to(device)
    mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
    rows: List[dict] = []
    t0 = time.perf_counter()
    from adapters import Fuse

    for mode in ("inference", "train_step"):
        for m in (hub, acc):
            if mode == "train_step":
                m.train_adapter_fusion(Fuse(*names))  # freezes the adapters, unfreezes the fusion, train()
            else:
                m.eval()
        err = _check(hub, acc, ids, mask, mode)
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
        status = "ok" if err <= tol else "WRONG"
        cases = [Case("adapters", lambda: _calls(hub, ids, mask)[mode])]
        if status == "ok":
            cases.append(Case("accelerated", lambda: _calls(acc, ids, mask)[mode]))
        by = run_cases(cases, cfg, device)
        load = env.load1()
        for p in PROVIDERS:
            c = by.get(p)
            s = c.samples if c else []
            rows.append(dict(
                mode=mode, provider=p, status="ok" if p == "adapters" else status, rel_err=0.0 if p == "adapters" else err,
                **sample_columns(c), speedup=paired_ratio(by["adapters"].samples, s) if s else float("nan"), tokens=tokens, seq_len=seq_len,
                n_adapters=n, layers=layers, hidden=cfg["shape"].hidden, dtype=meta["dtype"], device=meta["device"],
                threads=meta["threads"], load1=load, torch=versions.get("torch", ""),
                adapters=versions.get("adapters", ""), afkern=afkern.__version__))
        at = {r["provider"]: r for r in rows if r["mode"] == mode}
        print(f"  {mode}: adapters {at['adapters']['median_ms']:.1f} ms, accelerated {at['accelerated']['median_ms']:.1f} "
              f"ms: {at['accelerated']['speedup']:.2f}x (rel. err {err:.1e})", flush=True)
        write_csv(os.path.join(out_dir, "accelerate.csv"), rows, COLUMNS)
    summary = _summary(rows)
    print("\n" + summary)
    md = os.path.join(out_dir, "accelerate.md")
    _write_md(md, rows, summary, meta, argv)
    print(f"\nwrote {os.path.join(out_dir, 'accelerate.csv')}, {md} in {time.perf_counter() - t0:.0f}s")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _summary(rows: List[dict]) -> str:
    lines = []
    for mode, target in TARGETS.items():
        at = {r["provider"]: r for r in rows if r["mode"] == mode}
        s = at["accelerated"]["speedup"]
        verdict = "met" if s >= target else "NOT met"
        lines.append(f"{mode}: AdapterHub {at['adapters']['median_ms']:.1f} ms, after afkern.accelerate "
                     f"{at['accelerated']['median_ms']:.1f} ms: {s:.2f}x faster (target >= {target:g}x: {verdict})")
    return "\n".join(lines)


def _write_md(path: str, rows: List[dict], summary: str, meta: dict, argv: List[str]) -> None:
    out = ["# afkern-bench --accelerate", "", f"`afkern-bench {' '.join(argv)}` on {meta['device']}, {meta['dtype']}, "
           f"{meta['threads']} torch threads (load average {min(r['load1'] for r in rows):.2f} to "
           f"{max(r['load1'] for r in rows):.2f}: a shared machine varies between runs; the ratio pairs samples of "
           "the same round).", "", "```", summary, "```", "",
           "| mode | provider | median ms | p20 | p80 | speedup | rel. err | status |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['provider']} | {fmt(r['median_ms'], '.1f')} | {fmt(r['p20_ms'], '.1f')} | {fmt(r['p80_ms'], '.1f')} | "
                   f"{fmt(r['speedup'], '.2f')} | {fmt(r['rel_err'], '.1e')} | {r['status']} |")
    atomic_write_bytes(path, ("\n".join(out) + "\n").encode())
