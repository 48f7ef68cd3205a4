"""The performance targets of the design notes (section 5), judged on this run's measurements.

With ``fast`` the backend ``auto`` picks on the device and N = 16:

* CPU, block, per token count: ``fast`` at least 4x faster than ``adapters`` in ``forward`` and
  3.5x in ``full`` (ratio of the two medians of the same group);
* whole model, ``fast``'s cost relative to the plain model (median over rounds of the per-round
  ratio): CPU inference at most 1.35x; CUDA inference at most 1.3x and a training step at most 1.5x;
* cost per added adapter (block fit of ``fast``): at most 2% of a plain layer -- judged only
  when the fit is reliable (:mod:`.stats`); otherwise the line says "unreliable" and why, since a
  negative or poorly determined slope says nothing about the cost of an adapter.

Each line ends in ``met``, ``MISSED`` or ``unreliable (...)``.
"""

from __future__ import annotations

import math
from typing import List

import torch

__all__ = ["target_lines"]

N_TARGET = 16
SLOPE_TARGET_PCT = 2.0


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def target_lines(rows: List[dict], fits: List[dict], device: torch.device, fast: str) -> List[str]:
    """One line per target measured in this run (CPU targets on CPU, GPU ones on CUDA)."""
    lines = []

    def med(kind, prov, mode, tokens, family):
        c = [r for r in rows if (r["kind"], r["provider"], r["mode"], r["n"], r["tokens"], r.get("family", ""))
             == (kind, prov, mode, N_TARGET, tokens, family)
             and r["status"] == "ok" and isinstance(r.get("median_ms"), float)]
        return c[-1] if c else None

    def points(kind):
        return sorted({(r.get("family", ""), r["tokens"]) for r in rows if r["kind"] == kind and r["n"] == N_TARGET})

    def label(family):
        return f"{family} " if family not in ("", "bert") else ""

    if device.type != "cuda":
        for mode, want in (("forward", 4.0), ("full", 3.5)):
            for fam, t in points("block"):
                a, f = med("block", "adapters", mode, t, fam), med("block", fast, mode, t, fam)
                if a and f:
                    s = a["median_ms"] / f["median_ms"]
                    lines.append(f"{label(fam)}block N={N_TARGET} {t} tok {mode}: {fast} {s:.2f}x faster than adapters "
                                 f"(target >= {want}x: {_verdict(s >= want)})")
    goals = {"inference": 1.35} if device.type != "cuda" else {"inference": 1.3, "train_step": 1.5}
    for mode, want in goals.items():
        for fam, t in points("model"):
            f, a = med("model", fast, mode, t, fam), med("model", "adapters", mode, t, fam)
            if f and isinstance(f.get("ratio_to_plain"), float) and not math.isnan(f["ratio_to_plain"]):
                extra = f"; adapters {a['ratio_to_plain']:.2f}x" if a and isinstance(a.get("ratio_to_plain"), float) else ""
                lines.append(f"{label(fam)}model Fuse({N_TARGET}) {t} tok {mode}: {fast} {f['ratio_to_plain']:.2f}x the "
                             f"plain model{extra} (target <= {want}x: {_verdict(f['ratio_to_plain'] <= want)})")
    for fit in fits:
        if fit["provider"] != fast or math.isnan(fit["slope_pct_of_layer"]):
            continue
        p = fit["slope_pct_of_layer"]
        head = (f"{label(fit.get('family', ''))}block {fit['mode']} {fit['tokens']} tok: {fit['slope_ms']:+.3f} ms per "
                f"added adapter = {p:.2f}% of a plain layer")
        if fit["reliable"]:
            lines.append(f"{head} (target <= {SLOPE_TARGET_PCT:g}%: {_verdict(p <= SLOPE_TARGET_PCT)})")
        else:
            lines.append(f"{head} (target <= {SLOPE_TARGET_PCT:g}%: unreliable ({fit['unreliable_reason']}), "
                         f"not judged)")
    return lines
