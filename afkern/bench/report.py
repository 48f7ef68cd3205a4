"""The run's outputs: the console table, ``bench.csv``, ``results.md`` and the PNG plots.

Every file is written atomically (``afkern._io``), so an interrupted run never leaves a
half-written file where a good one was. Per results folder:

* ``bench.csv`` -- one row per (family, kind, provider, mode, N, tokens): status, the correctness
  guard's errors, median / p20 / p80 of the samples (ms per call), peak memory, the ratios to
  ``adapters`` and to ``plain`` (medians over rounds of per-round ratios), device, threads, clock,
  load average and library versions (:data:`CSV_COLUMNS`);
* ``results.md`` -- the command, the targets, the fits (with R^2, the slope's standard error and
  whether each can be quoted) and the table;
* ``block_<mode>_t<tokens>.png`` -- block time against N per provider, with its fit (dashed and
  marked when unreliable); ``model_ratio.png`` -- whole-model cost relative to the plain model
  against N. Families other than BERT prefix their plots with ``<family>_``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Dict, List, Sequence

from .._io import atomic_save_png, atomic_write_bytes
from .providers import BASELINES
from .stats import percentile

__all__ = ["CSV_COLUMNS", "write_csv", "format_table", "format_summary", "write_markdown", "write_plots", "fmt"]

CSV_COLUMNS = [
    "kind", "family", "provider", "mode", "n", "tokens", "batch", "seq_len", "layers", "hidden", "intermediate",
    "bottleneck", "dtype", "status", "rel_err", "ref_rel_err", "median_ms", "p20_ms", "p80_ms", "repeats", "inner",
    "peak_mem_mb", "speedup_vs_adapters", "ratio_to_plain", "device", "device_type", "threads", "clock", "load1",
    "torch", "transformers", "adapters", "triton", "afkern", "python", "timestamp",
]


def fmt(v, spec: str = ".3f") -> str:
    """A number for a table; ``-`` for missing or nan."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return "-"
    return format(v, spec)


def _fmt_csv(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def write_csv(path: str, rows: List[dict], columns: Sequence[str] = CSV_COLUMNS) -> None:
    """The rows as CSV (``columns``, nan as an empty cell), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt_csv(r.get(k, "")) for k in columns})
    atomic_write_bytes(path, buf.getvalue().encode())


def format_table(rows: List[dict]) -> str:
    families = {r.get("family", "") for r in rows}
    head = ["kind", "mode", "N", "tokens", "provider", "status", "median ms", "p20", "p80", "peak MiB", "vs adapters",
            "vs plain"]
    if len(families) > 1:
        head = ["family"] + head
    body = []
    for r in rows:
        st = r["status"]
        cells = [
            r["kind"], r["mode"], str(r["n"]), str(r["tokens"]), r["provider"], st if len(st) <= 40 else st[:37] + "...",
            fmt(r.get("median_ms")), fmt(r.get("p20_ms")), fmt(r.get("p80_ms")), fmt(r.get("peak_mem_mb"), ".1f"),
            fmt(r.get("speedup_vs_adapters"), ".2f") + ("x" if fmt(r.get("speedup_vs_adapters")) != "-" else ""),
            fmt(r.get("ratio_to_plain"), ".2f") + ("x" if fmt(r.get("ratio_to_plain")) != "-" else ""),
        ]
        body.append(([r.get("family", "")] if len(families) > 1 else []) + cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def fit_summary(f: dict) -> str:
    """R^2, the slope's standard error and the verdict of a fit, for the console and markdown."""
    se = "" if math.isnan(f["slope_se_ms"]) else f", +- {f['slope_se_ms']:.4f}"
    return f"R^2 {f['r2']:.3f}{se}; " + ("reliable" if f["reliable"] else f"unreliable ({f['unreliable_reason']})")


def format_summary(rows: List[dict], fits: List[dict], mslopes: List[dict], targets: List[str]) -> str:
    """The console report: the table, the fits and the targets."""
    out = [format_table(rows)]
    if fits:
        out.append("\nlinear fits, block time = intercept + slope * N:")
        out += [f"  {f['family']:>5} {f['provider']:>9} {f['mode']:>8} {f['tokens']:>5} tok: intercept "
                f"{f['intercept_ms']:.3f} ms, slope {f['slope_ms']:.4f} ms/adapter = "
                f"{fmt(f['slope_pct_of_layer'], '.2f')}% of a plain layer; {fit_summary(f)}" for f in fits]
    if mslopes:
        out.append("whole model, added time per adapter per layer:")
        out += [f"  {m['family']:>5} {m['provider']:>9} {m['mode']:>10} {m['tokens']:>5} tok: "
                f"{m['slope_ms_per_layer']:.4f} ms = {fmt(m['slope_pct_of_layer'], '.2f')}% of a plain layer; "
                f"{fit_summary(m)}" for m in mslopes]
    if targets:
        out.append("targets (this run):")
        out += ["  " + t for t in targets]
    return "\n".join(out)


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
           "the site without adapters, model: the model without adapters); both ratios are medians over rounds of "
           "the ratio of the two samples taken in the same round. What is timed and how: the module docstrings "
           "of `afkern/bench/` (`cases.py`, `timing.py`; the correctness guard: `check.py`; fits: `stats.py`).", ""]
    if targets:
        out += ["## Targets", ""] + [f"- {t}" for t in targets] + [""]
    if fits:
        out += ["## Linear fits, block time against N", "",
                "| family | provider | mode | tokens | intercept ms | slope ms/adapter | slope % of a plain layer | fit |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {f['family']} | {f['provider']} | {f['mode']} | {f['tokens']} | {f['intercept_ms']:.3f} | "
                f"{f['slope_ms']:.4f} | {fmt(f['slope_pct_of_layer'], '.2f')} | {fit_summary(f)} |" for f in fits] + [""]
    if mslopes:
        out += ["## Whole model: added cost per adapter per layer", "",
                "| family | provider | mode | tokens | ms per adapter per layer | % of a plain layer | fit |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {m['family']} | {m['provider']} | {m['mode']} | {m['tokens']} | {m['slope_ms_per_layer']:.4f} | "
                f"{fmt(m['slope_pct_of_layer'], '.2f')} | {fit_summary(m)} |" for m in mslopes] + [""]
    out += ["## All cases", "", format_table(rows), ""]
    atomic_write_bytes(path, "\n".join(out).encode())


def _save_fig(fig, path: str) -> None:
    atomic_save_png(fig, path, dpi=110)


def _prefix(family: str) -> str:
    return "" if family in ("", "bert") else f"{family}_"


def write_plots(out_dir: str, rows: List[dict], fits: List[dict], title: str) -> List[str]:
    """The PNG plots (module doc); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    blocks = [r for r in rows if r["kind"] == "block" and r["status"] == "ok" and isinstance(r.get("median_ms"), float)]
    for family, mode, tokens in sorted({(r.get("family", ""), r["mode"], r["tokens"]) for r in blocks}):
        sel = [r for r in blocks if (r.get("family", ""), r["mode"], r["tokens"]) == (family, mode, tokens)]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ns_all = sorted({r["n"] for r in sel if r["provider"] not in BASELINES})
        for prov in sorted({r["provider"] for r in sel}):
            pts = sorted((r["n"], r["median_ms"], r["p20_ms"], r["p80_ms"]) for r in sel if r["provider"] == prov)
            if prov in BASELINES:  # timed with every N: the median of its medians
                y = percentile([p[1] for p in pts], 0.5)
                ax.axhline(y, ls=":", color="gray" if prov == "plain" else "black", lw=1, label=f"{prov} ({y:.2f} ms)")
                continue
            ns = [p[0] for p in pts]
            line = ax.errorbar(ns, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                               marker="o", ls="none", capsize=3)
            fit = next((f for f in fits if (f["family"], f["provider"], f["mode"], f["tokens"]) == (family, prov, mode, tokens)),
                       None)
            if fit is not None and ns_all:
                xs = np.linspace(min(ns_all), max(ns_all), 50)
                note = "" if fit["reliable"] else f" [unreliable: {fit['unreliable_reason']}]"
                ax.plot(xs, fit["intercept_ms"] + fit["slope_ms"] * xs, color=line[0].get_color(), lw=1,
                        ls="-" if fit["reliable"] else "--",
                        label=f"{prov}: {fit['intercept_ms']:.2f} + {fit['slope_ms']:.3f}*N ms{note}")
            else:
                line[0].set_label(prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (adapters fused)")
        ax.set_ylabel("time per call (ms, median, p20-p80)")
        ax.set_title(f"{family or 'fused'} block, {mode}, {tokens} tokens\n{title}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(out_dir, f"{_prefix(family)}block_{mode}_t{tokens}.png")
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)
    models = [r for r in rows if r["kind"] == "model" and r["status"] == "ok" and isinstance(r.get("ratio_to_plain"), float)
              and r["provider"] != "plain" and not math.isnan(r["ratio_to_plain"])]
    for family in sorted({r.get("family", "") for r in models}):
        sel = [r for r in models if r.get("family", "") == family]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for prov, mode, tokens in sorted({(r["provider"], r["mode"], r["tokens"]) for r in sel}):
            pts = sorted((r["n"], r["ratio_to_plain"]) for r in sel if (r["provider"], r["mode"], r["tokens"]) == (prov, mode, tokens))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if mode == "inference" else "--",
                    label=f"{prov} {mode} ({tokens} tok)")
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (adapters fused)")
        ax.set_ylabel("time / plain model time")
        ax.set_title(f"whole {family or 'model'} ({sel[0]['layers']} layers) with Fuse(N) vs the plain model\n{title}",
                     fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(out_dir, f"{_prefix(family)}model_ratio.png")
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)
    return written
