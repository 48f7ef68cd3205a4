"""``afkern-bench --multifusion``: K fusions over one adapter set, one mixed batch (issue 12,
docs/DESIGN.md section 7).

The case: a BERT-base-width model (``--hidden-size`` 768, ``--intermediate-size`` 3072, ``--heads``
12), ``--layers`` layers (default 4), N = ``--model-n-adapters`` adapters (default 16) and K
fusions over all of them (each its own query, key and value: the paper's many target tasks), a
batch of ``--model-tokens`` tokens (default 512) in sequences of ``--seq-len`` tokens (default
64), sequence i routed to fusion i mod K (so the route is interleaved, not grouped). Inference,
float32 on CPU by default. Timed in one group per K, round-robin (``afkern.bench.timing``):

* ``mixed``      -- afkern, the whole batch in one forward under ``afkern.route`` (segmented GEMMs);
* ``one_fusion`` -- afkern, the same batch through one fusion (the target: mixed <= 1.15x this);
* ``switching``  -- afkern, K sub-batches (one per fusion) through one model that switches its
  active fusion between them: what a user of a one-fusion-per-batch library does today;
* ``adapters_switching`` -- AdapterHub's ``adapters`` with K named fusions
  (``Fuse(..., name=...)``), switching the active ``Fuse`` per sub-batch (it cannot hold a
  ``Fuse`` in ``Parallel`` / ``BatchSplit``, adapters issue #268);
* ``plain``      -- the model without adapters (the floor).

Before timing, the mixed output is checked against ``switching`` (each sequence through its own
fusion) and ``adapters_switching`` against ``switching`` (AdapterHub loaded from the directories
afkern saved: same weights). Writes ``multifusion.csv``, ``multifusion.md`` and
``multifusion_k.png`` (time against K per provider) under ``OUTPUT_DIR/<device-slug>/``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .._io import atomic_save_png, atomic_write_bytes
from .report import write_csv
from . import env
from .options import case_group, positive_ints
from .stats import paired_ratio, sample_columns
from .timing import Case, run_cases

__all__ = ["add_arguments", "run", "build_models", "TARGET_RATIO", "PROVIDERS"]

TARGET_RATIO = 1.15
PROVIDERS = ("mixed", "one_fusion", "switching", "adapters_switching", "plain")
COLUMNS = ["k", "provider", "status", "rel_err", "median_ms", "p20_ms", "p80_ms", "repeats", "inner",
           "ratio_to_one_fusion", "ratio_to_mixed", "tokens", "seq_len", "n_adapters", "layers", "hidden", "dtype",
           "device", "threads", "load1", "torch", "adapters", "afkern"]


def add_arguments(p) -> None:
    g = case_group(p, "several fusions in one batch", "--multifusion",
                   "a mixed batch over K fusions in one forward against one fusion, K sub-batches switching the "
                   "active fusion, and AdapterHub switching its active Fuse (defaults: 4 layers, N=16, 512 tokens "
                   "in sequences of 64)")
    g.add_argument("--fusions", default="1,2,4,8",
                   help="--multifusion: the K values (comma-separated); the largest is the headline case")


# ---------------------------------------------------------------------------------- models
def build_models(shape, n: int, k: int, layers: int, device, dtype, seed: int, with_adapters: bool = True):
    """(afkern model with N adapters and fusions f0..f{k-1}, AdapterHub model with the same
    weights or None and why, plain model), eval mode, on ``device`` in ``dtype``."""
    import afkern
    from transformers import BertConfig, BertModel

    from .models import perturb

    cfg = BertConfig(vocab_size=128, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                     num_hidden_layers=layers, num_attention_heads=shape.heads, max_position_embeddings=512)
    torch.manual_seed(seed)
    pm = BertModel(cfg).eval()
    fm = BertModel(cfg).eval()
    fm.load_state_dict(pm.state_dict())
    names = [f"task{i}" for i in range(n)]
    afkern.patch_bert(fm, names, afkern.AdapterConfig.pfeiffer(reduction_factor=shape.reduction_factor),
                      fusion_config=False, backend="torch")
    for j in range(k):
        afkern.add_fusion(fm, f"f{j}", names)
    afkern.set_active_fusion(fm, "f0")
    perturb(fm, torch.Generator().manual_seed(seed + 1))
    am, why = None, "not asked for"
    if with_adapters:
        try:
            import adapters  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the install
            why = f"the adapters package is not importable ({exc})"
        else:
            am = hub_copy(fm, pm, names, k)
            why = "ok"
    fm.eval()
    for p in fm.parameters():
        p.requires_grad_(False)
    out = [fm.to(device=device, dtype=dtype), None if am is None else am.to(device=device, dtype=dtype),
           pm.to(device=device, dtype=dtype)]
    return out[0], out[1], why, out[2]


def hub_copy(fm: nn.Module, pm: nn.Module, names: List[str], k: int) -> nn.Module:
    """AdapterHub model (pm's class, pm's weights) with fm's adapters and fusions f0..f{k-1},
    through the directories afkern writes."""
    import adapters

    import afkern

    am = type(pm)(pm.config).eval()
    am.load_state_dict(pm.state_dict())
    adapters.init(am)
    with tempfile.TemporaryDirectory() as tmp:
        written = afkern.save_adapterhub(fm, tmp, safe_serialization=True)
        for n in names:
            am.load_adapter(written[n], use_safetensors=True)
        for j in range(k):
            am.load_adapter_fusion(written[f"f{j}"], use_safetensors=True, set_active=False)
    for p in am.parameters():
        p.requires_grad_(False)
    return am.eval()


# ---------------------------------------------------------------------------------- calls
def _calls(fm, am, pm, ids, mask, route: List[str], names: List[str]):
    import afkern

    groups = {f: [i for i, r in enumerate(route) if r == f] for f in dict.fromkeys(route)}
    sub = {f: (ids[idx], mask[idx]) for f, idx in groups.items()}

    @torch.no_grad()
    def mixed():
        with afkern.route(fm, fusion=route):
            return fm(ids, attention_mask=mask).last_hidden_state

    @torch.no_grad()
    def one_fusion():
        afkern.set_active_fusion(fm, route[0])
        return fm(ids, attention_mask=mask).last_hidden_state

    @torch.no_grad()
    def switching():
        outs = []
        for f, (i, m) in sub.items():
            afkern.set_active_fusion(fm, f)
            outs.append(fm(i, attention_mask=m).last_hidden_state)
        return outs

    calls = {"mixed": mixed, "one_fusion": one_fusion, "switching": switching}
    if am is not None:
        from adapters.composition import Fuse

        @torch.no_grad()
        def adapters_switching():
            outs = []
            for f, (i, m) in sub.items():
                am.set_active_adapters(Fuse(*names, name=f))
                outs.append(am(i, attention_mask=m).last_hidden_state)
            return outs

        calls["adapters_switching"] = adapters_switching

    @torch.no_grad()
    def plain():
        return pm(ids, attention_mask=mask).last_hidden_state

    calls["plain"] = plain
    return calls, groups


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _check(calls, groups) -> Dict[str, float]:
    """Relative errors: mixed against switching (reordered to the batch), AdapterHub against afkern."""
    sw = calls["switching"]()
    order = [i for idx in groups.values() for i in idx]
    ref = torch.empty_like(torch.cat(sw))
    ref[torch.tensor(order)] = torch.cat(sw)
    errs = {"mixed": _rel(calls["mixed"](), ref), "switching": 0.0}
    if "adapters_switching" in calls:
        errs["adapters_switching"] = _rel(torch.cat(calls["adapters_switching"]()), torch.cat(sw))
    return errs


# ---------------------------------------------------------------------------------- run
def run(args, cfg: dict, out_dir: str, argv: List[str]) -> int:
    """The multi-fusion benchmark (module doc); returns the exit status."""
    import afkern

    device, dtype = cfg["device"], cfg["dtype"]
    ks = positive_ints(args.fusions, "--fusions")
    layers = args.layers or 4
    tokens = (args.model_tokens or [512])[0]
    n = (args.model_n_adapters or [16])[0]
    seq_len = args.seq_len if args.seq_len != 128 else 64  # the sweep's default 128 -> this case's 64
    if tokens % seq_len:
        raise SystemExit(f"afkern-bench: --model-tokens {tokens} must be a multiple of --seq-len {seq_len}")
    batch = tokens // seq_len
    if ks[-1] > batch:
        raise SystemExit(f"afkern-bench: K = {ks[-1]} fusions need at least {ks[-1]} sequences; the batch has {batch}")
    versions = env.library_versions()
    meta = dict(device=env.device_name(device), threads=torch.get_num_threads(), dtype=str(dtype).replace("torch.", ""),
                **versions)
    print(f"afkern-bench --multifusion {afkern.__version__} on {meta['device']}, {meta['dtype']}, {meta['threads']} "
          f"threads: {layers} layers, d={cfg['shape'].hidden}, N={n}, K in {ks}, {batch} x {seq_len} tokens", flush=True)
    fm, am, why, pm = build_models(cfg["shape"], n, ks[-1], layers, device, dtype, cfg["seed"])
    if am is None:
        print(f"  adapters_switching skipped: {why}", flush=True)
    names = [f"task{i}" for i in range(n)]
    g = torch.Generator().manual_seed(cfg["seed"] + 7)
    ids = torch.randint(0, 128, (batch, seq_len), generator=g).to(device)
    mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
    rows: List[dict] = []
    t0 = time.perf_counter()
    for k in ks:
        route = [f"f{i % k}" for i in range(batch)]
        calls, groups = _calls(fm, am, pm, ids, mask, route, names)
        errs = _check(calls, groups)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        status = {p: ("ok" if errs.get(p, 0.0) <= (tol if p != "adapters_switching" else 10 * tol) else "WRONG")
                  for p in calls}
        cases = [Case(p, (lambda c=c: c)) for p, c in calls.items() if status[p] == "ok"]
        by = run_cases(cases, cfg, device)
        load = env.load1()
        for p in calls:
            c = by.get(p)
            s = c.samples if c else []
            row = dict(k=k, provider=p, status=status[p], rel_err=errs.get(p, float("nan")), **sample_columns(c),
                       ratio_to_one_fusion=paired_ratio(s, by["one_fusion"].samples) if s and "one_fusion" in by else float("nan"),
                       ratio_to_mixed=paired_ratio(s, by["mixed"].samples) if s and "mixed" in by else float("nan"),
                       tokens=tokens, seq_len=seq_len, n_adapters=n, layers=layers, hidden=cfg["shape"].hidden,
                       dtype=meta["dtype"], device=meta["device"], threads=meta["threads"], load1=load,
                       torch=versions.get("torch", ""), adapters=versions.get("adapters", ""), afkern=afkern.__version__)
            rows.append(row)
        line = ", ".join(f"{r['provider']} {r['median_ms']:.1f} ms" for r in rows if r["k"] == k)
        mixed = next(r for r in rows if r["k"] == k and r["provider"] == "mixed")
        print(f"  K={k}: {line}; mixed / one_fusion = {mixed['ratio_to_one_fusion']:.3f} "
              f"(mixed rel. err {errs['mixed']:.1e})", flush=True)
        write_csv(os.path.join(out_dir, "multifusion.csv"), rows, COLUMNS)
    summary = _summary(rows, ks[-1])
    print("\n" + summary)
    written = [os.path.join(out_dir, "multifusion.csv"), os.path.join(out_dir, "multifusion.md")]
    _write_md(written[1], rows, summary, meta, argv)
    if not args.no_plots:
        written.append(_plot(os.path.join(out_dir, "multifusion_k.png"), rows, meta))
    print(f"\nwrote {', '.join(written)} in {time.perf_counter() - t0:.0f}s")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _summary(rows: List[dict], K: int) -> str:
    at = {r["provider"]: r for r in rows if r["k"] == K}
    ratio = at["mixed"]["ratio_to_one_fusion"]
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    lines = [f"K = {K} fusions, one mixed batch: {at['mixed']['median_ms']:.1f} ms; the same batch through one fusion "
             f"{at['one_fusion']['median_ms']:.1f} ms: mixed / one fusion = {ratio:.3f} (target <= {TARGET_RATIO}: {verdict})"]
    for p in ("switching", "adapters_switching", "plain"):
        r = at.get(p)
        if r is not None and r["repeats"]:
            lines.append(f"  {p}: {r['median_ms']:.1f} ms = {r['ratio_to_mixed']:.2f}x the mixed batch")
    return "\n".join(lines)


def _write_md(path: str, rows: List[dict], summary: str, meta: dict, argv: List[str]) -> None:
    out = ["# afkern-bench --multifusion", "", f"`afkern-bench {' '.join(argv)}` on {meta['device']}, {meta['dtype']}, "
           f"{meta['threads']} torch threads (load average {min(r['load1'] for r in rows):.2f} to "
           f"{max(r['load1'] for r in rows):.2f}: a shared machine varies between runs).", "", "```", summary, "```", "",
           "| K | provider | median ms | p20 | p80 | / one fusion | / mixed | rel. err | status |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['k']} | {r['provider']} | {_f(r['median_ms'])} | {_f(r['p20_ms'])} | {_f(r['p80_ms'])} | "
                   f"{_f(r['ratio_to_one_fusion'], '.3f')} | {_f(r['ratio_to_mixed'], '.2f')} | {_f(r['rel_err'], '.1e')} | "
                   f"{r['status']} |")
    atomic_write_bytes(path, ("\n".join(out) + "\n").encode())


def _f(v, spec=".1f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _plot(path: str, rows: List[dict], meta: dict) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p in PROVIDERS:
        pts = [(r["k"], r["median_ms"]) for r in rows if r["provider"] == p and r["repeats"]]
        if pts:
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=p)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fusions K in the batch")
    ax.set_ylabel("ms per batch (median)")
    r0 = rows[0]
    ax.set_title(f"{r0['layers']} layers, d={r0['hidden']}, N={r0['n_adapters']}, {r0['tokens']} tokens\n"
                 f"{meta['device']}, {meta['dtype']}, {meta['threads']} threads", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_save_png(fig, path)
