#!/usr/bin/env python3
"""Helpers of scripts/gpu_validate.sh: the device slug, the test-stage summary, the roofline
report of afkern-bench results, and the final stage table. Each prints a short table LAST (the
device tool returns only the tail of the output). docs/GPU_RUNBOOK.md says how they are used.

    gpu_tools.py slug [--device cpu|cuda]           the results folder name of this machine's device
    gpu_tools.py tests-summary STATUS_TSV JUNIT_DIR   table of the kernel-test stage
    gpu_tools.py report ROOT SLUG [--parts a,b]      roofline + auto-order report of ROOT/<part>/SLUG/bench.csv
    gpu_tools.py stages STAGES_TSV                    the table of the stages this call ran

Roofline model of ``report`` (FLOPs and bytes are modelled, not measured): a case's FLOPs are
those of the GEMMs of the algorithm its provider runs, 2 M K N each (plus attention 4 T S d per
layer for whole layers); ``reference``/``adapters`` run the per-adapter algorithm (N adapters, key
and value maps on an [T, N, d] stack), afkern's backends the re-associated one (docs/DESIGN.md
section 2: folded at inference, unfolded in the gradient modes). A backward is, for every GEMM,
the input-gradient GEMM plus the weight-gradient GEMM where the weight trains (the fusion's query,
key and value: the benchmark trains only those). Bytes are op-level: every GEMM and every
elementwise pass (residual add + LayerNorm, row op, activation) reads its operands once and writes
its result once, in the run's dtype; fused kernels move fewer, so GB/s above the copy ceiling
means fusion. ``%mm`` = achieved TFLOP/s over the card's measured matmul rate in that dtype,
``%bw`` = achieved GB/s over the measured copy bandwidth, ``%roof`` = max(FLOPs/rate, bytes/bw)
over the measured time (100% = at the roofline).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

AFKERN = ("torch", "triton", "cuda")
ORDER = ("plain", "plain_layer", "adapters", "reference", "torch", "triton", "cuda")
BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------------------------ slug


def _slugify(name: str) -> str:
    s = re.sub(r"\((r|tm|c)\)", " ", name.lower())
    s = re.sub(r"@.*$", " ", s)
    s = re.sub(r"\b(cpu|processor|\d+-core)\b", " ", s)
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")


def device_slug(device: str) -> str:
    """afkern-bench's folder name for the device (its own function when importable)."""
    import torch

    dev = torch.device(device)
    try:
        from afkern.bench.env import device_slug as bench_slug

        return bench_slug(dev)
    except Exception:  # the bench package is being reorganised: the same rule, kept here
        if dev.type == "cuda":
            return _slugify(torch.cuda.get_device_name(dev)) or "cuda"
        name = "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "cpu")
        except OSError:
            pass
        return _slugify(name) or "cpu"


# ------------------------------------------------------------------------------------------ tables


def table(head: List[str], rows: List[List[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _f(v, spec=".3g", none="-") -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return none
    return format(v, spec)


# ------------------------------------------------------------------------------------------ tests


def tests_summary(status_tsv: str, junit_dir: str) -> int:
    """One line per entry of the test list: status, counts from its JUnit XML, seconds; the failing
    test ids (at most 12) above the table. Exit 1 if an entry that exists failed."""
    rows, failed_ids, bad = [], [], False
    with open(status_tsv) as f:
        entries = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    tot = dict(passed=0, failed=0, errors=0, skipped=0)
    for entry, status, secs, xml in entries:
        counts = dict(passed=0, failed=0, errors=0, skipped=0)
        if xml and os.path.exists(xml):
            try:
                root = ET.parse(xml).getroot()
                for case in root.iter("testcase"):
                    kids = {c.tag for c in case}
                    cid = f"{case.get('classname', '')}::{case.get('name', '')}"
                    if "failure" in kids:
                        counts["failed"] += 1
                        failed_ids.append(cid)
                    elif "error" in kids:
                        counts["errors"] += 1
                        failed_ids.append(cid + " (error)")
                    elif "skipped" in kids:
                        counts["skipped"] += 1
                    else:
                        counts["passed"] += 1
            except ET.ParseError:
                status += " (junit unreadable)"
        if not (status.startswith("ok") or status == "MISSING (not run)"):  # "ok (none ran)", "ok (dry: ...)"
            bad = True
        for k in tot:
            tot[k] += counts[k]
        rows.append([entry, status, str(counts["passed"]), str(counts["failed"]), str(counts["errors"]),
                     str(counts["skipped"]), secs])
    rows.append(["TOTAL", "FAILED" if bad else "ok", str(tot["passed"]), str(tot["failed"]), str(tot["errors"]),
                 str(tot["skipped"]), str(sum(int(float(e[2] or 0)) for e in entries))])
    if failed_ids:
        print(f"failing tests ({len(failed_ids)}; full list in the logs):")
        for cid in failed_ids[:12]:
            print("  " + cid)
    print(table(["test entry", "result", "passed", "failed", "errors", "skipped", "s"], rows))
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------ roofline model


class Work:
    """FLOPs and op-level elements moved by one case (module doc)."""

    def __init__(self):
        self.flops = 0.0
        self.elems = 0.0
        self.gemms: List[Tuple[float, float, float, bool]] = []
        self.ew = 0.0

    def gemm(self, M, K, N, trains=False):
        self.gemms.append((M, K, N, trains))
        self.flops += 2.0 * M * K * N
        self.elems += M * K + K * N + M * N

    def pointwise(self, read, write, flops=0.0):
        self.ew += read + write
        self.elems += read + write
        self.flops += flops

    def backward_of(self, fwd: "Work"):
        for M, K, N, trains in fwd.gemms:
            self.gemm(M, N, K)  # input gradient
            if trains:
                self.gemm(K, M, N)  # weight gradient
        self.pointwise(2 * fwd.ew, 0)


def _site(w: Work, kind: str, T, d, I, N, r):
    """One fused site (BertOutput: dense + adapters + fusion + LayerNorm), forward."""
    w.gemm(T, I, d)  # dense
    if kind == "plain":
        w.pointwise(2 * T * d, T * d)
        return
    w.pointwise(2 * T * d, T * d)  # h + input, LayerNorm: the adapters' input x
    if kind == "folded":  # [Z | A | sb] = x W_in, row op, [Y | p] W_out
        w.gemm(T, d, 2 * N * r + N)
        w.pointwise(T * (2 * N * r + N), T * (N * r + N))
        w.gemm(T, N * r + N, d)
    elif kind == "unfolded":
        w.gemm(T, d, d, trains=True)  # query
        w.gemm(T, d, d, trains=True)  # q' = q Wk (key)
        w.gemm(T, d, N * r)  # Z
        w.gemm(T, d, N * r)  # A
        w.gemm(T, d, N)  # sb
        w.pointwise(T * (2 * N * r + N), T * (N * r + N))
        w.gemm(T, N * r + N, d)  # mix
        w.gemm(T, d, d, trains=True)  # value
    else:  # naive: per adapter down/up, then query, key, value on the [T, N, d] stack
        for _ in range(N):
            w.gemm(T, d, r)
            w.pointwise(T * r, T * r)
            w.gemm(T, r, d)
        w.pointwise(T * N * d, T * N * d)  # stack
        w.gemm(T, d, d, trains=True)
        w.gemm(T * N, d, d, trains=True)
        w.gemm(T * N, d, d, trains=True)
        w.pointwise(T * d + T * N * d, T * N, flops=2.0 * T * N * d)  # scores
        w.pointwise(T * N * d + T * N, T * d, flops=2.0 * T * N * d)  # p-weighted sum
    w.pointwise(3 * T * d, T * d)  # residual, + input, LayerNorm


def _layer_head(w: Work, T, S, d, I):
    """A BERT layer up to the site: attention (QKV, flash-style core, out proj, add + LN), FFN in."""
    w.gemm(T, d, 3 * d)
    w.pointwise(3 * T * d, T * d, flops=4.0 * T * S * d)
    w.gemm(T, d, d)
    w.pointwise(2 * T * d, T * d)
    w.gemm(T, d, I)
    w.pointwise(T * I, T * I)


def _algo(provider: str, mode: str) -> str:
    if provider in ("plain", "plain_layer"):
        return "plain"
    if provider in ("reference", "adapters"):
        return "naive"
    return "folded" if mode in ("forward", "inference") else "unfolded"


def case_work(row: dict) -> Optional[Tuple[float, float]]:
    """(FLOPs, bytes) of one CSV row, or None when the row lacks a field."""
    try:
        T, d, I, r = (int(row[k]) for k in ("tokens", "hidden", "intermediate", "bottleneck"))
        N, L, S = int(row["n"]), int(row["layers"] or 1), int(row["seq_len"] or 128)
        b = BYTES.get(row["dtype"], 2)
    except (KeyError, ValueError):
        return None
    prov, mode, kind = row["provider"], row["mode"], row["kind"]
    algo = _algo(prov, mode)
    fwd = Work()
    if kind == "block":
        if prov == "plain_layer":
            _layer_head(fwd, T, S, d, I)
        _site(fwd, algo, T, d, I, N, r)
    else:
        fwd.pointwise(T * d, T * d)  # embeddings LayerNorm
        for _ in range(L):
            _layer_head(fwd, T, S, d, I)
            _site(fwd, algo, T, d, I, N, r)
    grad_modes = ("backward", "full", "train_step")
    if mode not in grad_modes:
        return fwd.flops, fwd.elems * b
    bwd = Work()
    bwd.backward_of(fwd)
    if kind == "model":  # attention core backward ~ 2x its forward
        bwd.flops += L * 8.0 * T * S * d
    if mode == "backward":
        return bwd.flops, bwd.elems * b
    return fwd.flops + bwd.flops, (fwd.elems + bwd.elems) * b


# ------------------------------------------------------------------------------------------ report


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def load_ceilings(root: str, slug: str) -> dict:
    p = os.path.join(root, "gpu-ceilings", slug, "ceilings.json")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _peak(ceil: dict, dtype: str) -> float:
    return _num(ceil.get("matmul_tflops", {}).get(dtype)) * 1e12


def enrich(rows: List[dict], ceil: dict) -> List[dict]:
    bw = _num(ceil.get("copy_gbps")) * 1e9
    out = []
    for r in rows:
        r = dict(r)
        ms = _num(r.get("median_ms"))
        fb = case_work(r)
        r["model_gflop"] = r["model_mb"] = r["tflops"] = r["gbps"] = r["pct_mm"] = r["pct_bw"] = r["pct_roof"] = float("nan")
        if fb is not None:
            flops, nbytes = fb
            r["model_gflop"], r["model_mb"] = flops / 1e9, nbytes / 1e6
            if r.get("status") == "ok" and ms > 0:
                s = ms / 1e3
                r["tflops"], r["gbps"] = flops / s / 1e12, nbytes / s / 1e9
                peak = _peak(ceil, r.get("dtype", ""))
                r["pct_mm"] = 100 * flops / s / peak if peak > 0 else float("nan")
                r["pct_bw"] = 100 * nbytes / s / bw if bw > 0 else float("nan")
                if peak > 0 and bw > 0:
                    r["pct_roof"] = 100 * max(flops / peak, nbytes / bw) / s
        out.append(r)
    return out


EXTRA = ["model_gflop", "model_mb", "tflops", "pct_mm", "gbps", "pct_bw", "pct_roof"]


def _group_key(r):
    return (r.get("part", ""), r["kind"], r["mode"], int(r["tokens"]), int(r.get("layers") or 1))


def summarize(rows: List[dict], ns_show=(1, 16, 64)) -> Tuple[str, dict]:
    """The compact table (one line per case: each provider's ms, the fastest afkern backend's rates)
    and the auto-order verdict."""
    groups: Dict[tuple, Dict[int, Dict[str, dict]]] = {}
    for r in rows:
        n = int(r["n"])
        g = groups.setdefault(_group_key(r), {})
        if r["provider"] in ("plain", "plain_layer"):
            g.setdefault(0, {}).setdefault(r["provider"], []).append(r)
        else:
            g.setdefault(n, {})[r["provider"]] = r
    provs = [p for p in ORDER if any(r["provider"] == p for r in rows)]
    head = ["case", "N"] + provs + ["best afkern", "TFLOP/s (%mm)", "GB/s (%bw)", "%roof", "vs adapters", "vs plain"]
    body = []
    ratios: Dict[str, List[float]] = {b: [] for b in AFKERN}
    wins: Dict[str, int] = {b: 0 for b in AFKERN}
    per_mode: Dict[str, Dict[str, List[float]]] = {}
    for key in sorted(groups):
        g = groups[key]
        base = {p: _med([_num(x.get("median_ms")) for x in g.get(0, {}).get(p, []) if x.get("status") == "ok"])
                for p in ("plain", "plain_layer")}
        ns = sorted(n for n in g if n)
        for n in ns:
            cell = g[n]
            ok = {b: cell[b] for b in AFKERN if b in cell and cell[b].get("status") == "ok"}
            if ok:
                best_t = min(_num(x["median_ms"]) for x in ok.values())
                best = min(ok, key=lambda b: _num(ok[b]["median_ms"]))
                wins[best] += 1
                for b in AFKERN:
                    v = _num(ok[b]["median_ms"]) / best_t if b in ok else float("nan")
                    ratios[b].append(v)
                    per_mode.setdefault(key[2], {}).setdefault(b, []).append(v)
            if n not in ns_show and n != max(ns):
                continue
            cells = []
            for p in provs:
                if p in base:
                    cells.append(_f(base[p], ".3f"))
                elif p in cell:
                    st = cell[p].get("status", "")
                    short = {"unavailable": "n/a", "mismatch": "MISMATCH", "error": "ERROR"}
                    cells.append(_f(_num(cell[p].get("median_ms")), ".3f") if st == "ok"
                                 else short.get(st.split(":")[0], st.split(":")[0][:8]))
                else:
                    cells.append("")
            if ok:
                br = ok[best]
                extra = [best, f"{_f(br['tflops'], '.1f')} ({_f(br['pct_mm'], '.0f')}%)",
                         f"{_f(br['gbps'], '.0f')} ({_f(br['pct_bw'], '.0f')}%)", _f(br["pct_roof"], ".0f") + "%",
                         _f(_num(br.get("speedup_vs_adapters")), ".2f") + "x", _f(_num(br.get("ratio_to_plain")), ".2f") + "x"]
            else:
                extra = ["-"] * 6
            part, kind, mode, T, L = key
            name = (f"{part[4:]}: " if part.startswith("gpu-") else "") + f"{kind} {mode} T={T}" + (f" L={L}" if kind == "model" else "")
            body.append([name, str(n)] + cells + extra)
    geo = {b: _geomean(v) for b, v in ratios.items()}
    ranked = sorted((b for b in AFKERN if not math.isnan(geo[b])), key=lambda b: geo[b])
    order = tuple(ranked[: ranked.index("torch") + 1]) if "torch" in ranked else tuple(ranked) + ("torch",)
    verdict = dict(geomean_time_over_best=geo, wins=wins, suggested_auto_gpu_order=list(order),
                   per_mode={m: {b: _geomean(v) for b, v in d.items()} for m, d in per_mode.items()})
    return table(head, body), verdict


def _med(xs):
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return float("nan")
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else 0.5 * (xs[k - 1] + xs[k])


def _no_nan(x):
    """JSON has no NaN: None instead."""
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _geomean(xs):
    xs = [x for x in xs if x > 0 and not math.isnan(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def report(root: str, slug: str, parts: Optional[List[str]]) -> int:
    ceil = load_ceilings(root, slug)
    if parts is None:
        parts = sorted(os.path.basename(os.path.dirname(os.path.dirname(p)))
                       for p in glob.glob(os.path.join(root, "gpu-*", slug, "bench.csv")))
        parts = [p for p in parts if p not in ("gpu-ceilings", "gpu-autotune")]
    all_rows, lines = [], []
    for part in parts:
        folder = os.path.join(root, part, slug)
        path = os.path.join(folder, "bench.csv")
        if not os.path.exists(path):
            lines.append(f"{part}: no bench.csv under {folder}")
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        rows = enrich(rows, ceil)
        for r in rows:
            r["part"] = part
        all_rows += rows
        cols = list(rows[0].keys()) if rows else []
        with open(os.path.join(folder, "roofline.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else
                                ("" if isinstance(v, float) else v)) for k, v in r.items()})
        tab, verdict = summarize(rows)
        verdict.update(part=part, device=slug, ceilings=ceil.get("summary", {}))
        with open(os.path.join(folder, "auto_order.json"), "w") as f:
            json.dump(_no_nan(verdict), f, indent=1)
        with open(os.path.join(folder, "roofline.md"), "w") as f:
            f.write(f"# {part} on {slug}: measured time against the card's ceilings\n\n"
                    f"Ceilings: {json.dumps(ceil.get('summary', {}))}\n\nModel of FLOPs and bytes: the docstring of "
                    f"scripts/gpu_tools.py. Per-provider rates of every case: roofline.csv.\n\n{tab}\n\n"
                    f"Suggested AUTO_GPU_ORDER: {tuple(verdict['suggested_auto_gpu_order'])} "
                    f"(geometric mean of time / fastest afkern backend per case: "
                    f"{ {b: round(v, 3) for b, v in verdict['geomean_time_over_best'].items() if not math.isnan(v)} }; "
                    f"wins {verdict['wins']})\n")
        bad = [r for r in rows if r.get("status") not in ("ok",) and not r.get("status", "").startswith("unavailable")]
        for r in bad[:6]:
            lines.append(f"{part}: {r['kind']} {r['mode']} N={r['n']} {r['provider']}: {r['status'][:150]}")
    if not all_rows:
        print("\n".join(lines) or f"no results under {root}/gpu-*/{slug}")
        return 1
    c = ceil.get("summary", {})
    print(f"ceilings ({slug}): " + (", ".join(f"{k} {v}" for k, v in c.items()) if c else
                                    "none measured (run stage ceilings): %mm / %bw / %roof left blank"))
    for ln in lines:
        print(ln)
    tab, verdict = summarize(all_rows)
    geo = {b: round(v, 3) for b, v in verdict["geomean_time_over_best"].items() if not math.isnan(v)}
    print(f"auto: time / fastest afkern backend, geometric mean over cases {geo}; wins {verdict['wins']}")
    for m, d in verdict["per_mode"].items():
        print(f"  {m}: " + ", ".join(f"{b} {v:.3f}" for b, v in d.items() if not math.isnan(v)))
    print(f"suggested one-line change in afkern/backends/__init__.py: AUTO_GPU_ORDER = {tuple(verdict['suggested_auto_gpu_order'])!r}")
    print(tab)
    return 0


# ------------------------------------------------------------------------------------------ stages


def stages(tsv: str) -> int:
    rows = []
    with open(tsv) as f:
        for ln in f:
            if ln.strip():
                parts = ln.rstrip("\n").split("\t") + ["", "", "", ""]
                rows.append(parts[:4])
    print(table(["stage", "result", "s", "note"], rows))
    return 0 if all(r[1] in ("ok", "skipped") for r in rows) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("slug")
    s.add_argument("--device", default=None)
    t = sub.add_parser("tests-summary")
    t.add_argument("status_tsv")
    t.add_argument("junit_dir")
    r = sub.add_parser("report")
    r.add_argument("root")
    r.add_argument("slug")
    r.add_argument("--parts", default=None, help="comma-separated gpu-* folders (default: every one with a bench.csv)")
    st = sub.add_parser("stages")
    st.add_argument("tsv")
    a = p.parse_args(argv)
    if a.cmd == "slug":
        import torch

        dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(device_slug(dev))
        return 0
    if a.cmd == "tests-summary":
        return tests_summary(a.status_tsv, a.junit_dir)
    if a.cmd == "report":
        return report(a.root, a.slug, a.parts.split(",") if a.parts else None)
    return stages(a.tsv)


if __name__ == "__main__":
    sys.exit(main())
