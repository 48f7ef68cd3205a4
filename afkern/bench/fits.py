"""Cost per added adapter: straight lines through the measured times against N.

* :func:`linear_fits` -- block: ``median time = intercept + slope * N`` per (family, provider,
  mode, tokens) over the timed N, and the slope as a percentage of a plain layer's time in the
  same mode and tokens (``plain_layer`` is timed in every group: the median of its medians).
* :func:`model_slopes` -- whole model: the slope of ``median time / layers`` against N, per
  provider and mode, as a percentage of a plain layer (the plain model's time / layers).

Each fit carries R^2, the standard error of its slope and whether it is reliable (:mod:`.stats`);
``slope_pct_of_layer`` of an unreliable fit is still reported, with the reason, but never judged.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from .providers import BASELINES
from .stats import fit_line, percentile

__all__ = ["linear_fits", "model_slopes"]


def _timed(r: dict) -> bool:
    return r.get("status") == "ok" and isinstance(r.get("median_ms"), float)


def _key(r: dict) -> Tuple[str, str, str, int]:
    return r.get("family", ""), r["provider"], r["mode"], r["tokens"]


def _fit_fields(xs: List[float], ys: List[float], base_ms: float) -> dict:
    f = fit_line(xs, ys)
    return {"slope_ms": f.slope, "intercept_ms": f.intercept, "points": f.points, "r2": f.r2, "slope_se_ms": f.slope_se,
            "reliable": f.reliable, "unreliable_reason": f.unreliable_reason,
            "slope_pct_of_layer": 100.0 * f.slope / base_ms if base_ms else float("nan")}


def linear_fits(rows: List[dict]) -> List[dict]:
    """Block fits (module doc), one dict per (family, provider, mode, tokens) with at least 2 N."""
    layer: Dict[Tuple[str, str, int], List[float]] = {}
    for r in rows:
        if r["kind"] == "block" and r["provider"] == "plain_layer" and _timed(r):
            layer.setdefault((r.get("family", ""), r["mode"], r["tokens"]), []).append(r["median_ms"])
    ok = [r for r in rows if r["kind"] == "block" and _timed(r) and r["provider"] not in BASELINES]
    fits = []
    for key in sorted({_key(r) for r in ok}):
        pts = sorted((r["n"], r["median_ms"]) for r in ok if _key(r) == key)
        if len({n for n, _ in pts}) < 2:
            continue
        family, prov, mode, tokens = key
        base = percentile(layer.get((family, mode, tokens), []), 0.5)
        fits.append(dict(family=family, provider=prov, mode=mode, tokens=tokens,
                         **_fit_fields([float(n) for n, _ in pts], [t for _, t in pts], base)))
    return fits


def model_slopes(rows: List[dict]) -> List[dict]:
    """Whole-model slopes per layer (module doc), one dict per (family, provider, mode, tokens)."""
    plain: Dict[Tuple[str, str, int], List[float]] = {}
    for r in rows:
        if r["kind"] == "model" and r["provider"] == "plain" and _timed(r):
            plain.setdefault((r.get("family", ""), r["mode"], r["tokens"]), []).append(r["median_ms"] / r["layers"])
    ok = [r for r in rows if r["kind"] == "model" and _timed(r) and r["provider"] != "plain"]
    out = []
    for key in sorted({_key(r) for r in ok}):
        sel = sorted((r["n"], r["median_ms"] / r["layers"]) for r in ok if _key(r) == key)
        if len({n for n, _ in sel}) < 2:
            continue
        family, prov, mode, tokens = key
        base = plain.get((family, mode, tokens))
        f = _fit_fields([float(n) for n, _ in sel], [t for _, t in sel], sum(base) / len(base) if base else 0.0)
        f["slope_ms_per_layer"] = f.pop("slope_ms")
        out.append(dict(family=family, provider=prov, mode=mode, tokens=tokens, **f))
    return out
